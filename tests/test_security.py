"""Transport security and bearer tokens, through real TLS handshakes and real clients."""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import json
import logging
import signal
import ssl
import subprocess
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from service.settings import Settings
from tests import onnx_models as models
from tests.conftest import ServerThread, http_client, serve
from tests.process import ROOT, start_on_loopback

INFERENCE_TOKEN = "inference-token-0123456789abcdef"
ADMIN_TOKEN = "admin-token-fedcba9876543210xyz"


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(
    folder: Path,
    stem: str,
    common_name: str,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    server: bool = False,
) -> tuple[Pair, x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(issuer_cert.subject if issuer_cert else _name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    certificate = builder.sign(issuer_key, hashes.SHA256())
    pair = Pair(folder / f"{stem}.crt", folder / f"{stem}.key")
    pair.cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    pair.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return pair, certificate, key


@dataclass(frozen=True)
class Certificates:
    ca: Path
    server: Pair
    client: Pair
    rogue_client: Pair  # signed by a CA the server does not trust


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    folder = tmp_path_factory.mktemp("pki")
    ca, ca_cert, ca_key = _issue(folder, "ca", "batchwise test CA", None, ca=True)
    server, _, _ = _issue(folder, "server", "localhost", (ca_cert, ca_key), server=True)
    client, _, _ = _issue(folder, "client", "a client", (ca_cert, ca_key))
    _, rogue_cert, rogue_key = _issue(folder, "rogue-ca", "another CA", None, ca=True)
    rogue_client, _, _ = _issue(folder, "rogue-client", "intruder", (rogue_cert, rogue_key))
    return Certificates(ca.cert, server, client, rogue_client)


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("security-repo")
    models.save(models.scale(2.0, ["batch", 4]), root, "double")
    return root


def _double(client: grpcclient.InferenceServerClient, **kwargs: object) -> np.ndarray:
    tensor = grpcclient.InferInput("x", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.arange(4, dtype=np.float32).reshape(1, 4))
    result = client.infer("double", [tensor], **kwargs)  # type: ignore[arg-type]
    output = result.as_numpy("y")
    assert output is not None
    return output


def _tls_client(
    server: ServerThread, certificates: Certificates, client: Pair | None = None
) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(
        f"localhost:{server.server.grpc_port}",
        ssl=True,
        root_certificates=str(certificates.ca),
        private_key=str(client.key) if client else None,
        certificate_chain=str(client.cert) if client else None,
    )


def _https(
    port: int,
    certificates: Certificates,
    method: str,
    path: str,
    body: str | None = None,
    client: Pair | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    """One request over HTTPS that trusts the test CA (and presents `client`)."""
    context = ssl.create_default_context(cafile=str(certificates.ca))
    if client is not None:
        context.load_cert_chain(str(client.cert), str(client.key))
    connection = http.client.HTTPSConnection("localhost", port, context=context, timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


_DOUBLE_JSON = json.dumps(
    {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0, 1, 2, 3]}]}
)


def _plain_http_fails(port: int) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/v2/health/live")
        return connection.getresponse().status != 200
    except (OSError, http.client.HTTPException):
        return True
    finally:
        connection.close()


# ---------------------------------------------------------------- TLS ---


@pytest.fixture(scope="module")
def tls_server(repository: Path, certificates: Certificates) -> Iterator[ServerThread]:
    with serve(
        repository, grpc_tls_cert=certificates.server.cert, grpc_tls_key=certificates.server.key
    ) as server:
        yield server


def test_tls_client_is_served(tls_server: ServerThread, certificates: Certificates) -> None:
    with _tls_client(tls_server, certificates) as client:
        np.testing.assert_array_equal(_double(client), [[0, 2, 4, 6]])


def test_https_is_served_and_plain_http_refused(
    tls_server: ServerThread, certificates: Certificates
) -> None:
    port = tls_server.server.http_port
    assert _https(port, certificates, "GET", "/v2/health/ready") == (200, b'{"ready":true}')
    status, body = _https(port, certificates, "POST", "/v2/models/double/infer", _DOUBLE_JSON)
    assert status == 200 and json.loads(body)["outputs"][0]["data"] == [0, 2, 4, 6]
    assert _plain_http_fails(port)
    import gevent.ssl

    def trusting_the_test_ca(*args: object, **kwargs: object) -> ssl.SSLContext:
        return gevent.ssl.create_default_context(cafile=str(certificates.ca))

    with (
        warnings.catch_warnings(),  # geventhttpclient 2.0 calls ssl.match_hostname
        http_client(
            f"localhost:{port}", ssl=True, ssl_context_factory=trusting_the_test_ca
        ) as client,
    ):
        warnings.simplefilter("ignore", DeprecationWarning)
        assert client.is_server_ready()


def test_plaintext_client_is_refused_when_tls_is_on(tls_server: ServerThread) -> None:
    client = grpcclient.InferenceServerClient(tls_server.url)
    with client, pytest.raises(InferenceServerException) as refused:
        client.is_server_live(client_timeout=5)
    assert refused.value.status() == "StatusCode.UNAVAILABLE"


def test_client_that_does_not_trust_the_server_is_refused(
    tls_server: ServerThread, certificates: Certificates
) -> None:
    client = grpcclient.InferenceServerClient(
        f"localhost:{tls_server.server.grpc_port}",
        ssl=True,
        root_certificates=str(certificates.rogue_client.cert),
    )
    with client, pytest.raises(InferenceServerException) as refused:
        client.is_server_live(client_timeout=5)
    assert refused.value.status() == "StatusCode.UNAVAILABLE"


def _health_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", "health", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_health_command_speaks_tls(tls_server: ServerThread, certificates: Certificates) -> None:
    address = f"localhost:{tls_server.server.grpc_port}"
    result = _health_command("--address", address, "--tls-ca", str(certificates.ca))
    assert (result.returncode, result.stdout.strip()) == (0, f"{address}: SERVING")
    plaintext = _health_command("--address", address, "--timeout", "2")
    assert plaintext.returncode == 1


# --------------------------------------------------------- mutual TLS ---


@pytest.fixture(scope="module")
def mtls_server(repository: Path, certificates: Certificates) -> Iterator[ServerThread]:
    with serve(
        repository,
        grpc_tls_cert=certificates.server.cert,
        grpc_tls_key=certificates.server.key,
        grpc_tls_client_ca=certificates.ca,
    ) as server:
        yield server


def test_mutual_tls_serves_a_client_with_a_trusted_certificate(
    mtls_server: ServerThread, certificates: Certificates
) -> None:
    with _tls_client(mtls_server, certificates, certificates.client) as client:
        np.testing.assert_array_equal(_double(client), [[0, 2, 4, 6]])
    address = f"localhost:{mtls_server.server.grpc_port}"
    result = _health_command(
        "--address",
        address,
        "--tls-ca",
        str(certificates.ca),
        "--tls-cert",
        str(certificates.client.cert),
        "--tls-key",
        str(certificates.client.key),
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_mutual_tls_over_https(mtls_server: ServerThread, certificates: Certificates) -> None:
    port = mtls_server.server.http_port
    status, _ = _https(
        port, certificates, "POST", "/v2/models/double/infer", _DOUBLE_JSON, certificates.client
    )
    assert status == 200
    for pair in (None, certificates.rogue_client):
        with pytest.raises((ssl.SSLError, ConnectionError)):
            _https(port, certificates, "GET", "/v2/health/live", client=pair)


@pytest.mark.parametrize("who", ["no certificate", "certificate from another CA"])
def test_mutual_tls_refuses_clients_without_a_trusted_certificate(
    mtls_server: ServerThread, certificates: Certificates, who: str
) -> None:
    pair = None if who == "no certificate" else certificates.rogue_client
    client = _tls_client(mtls_server, certificates, pair)
    with client, pytest.raises(InferenceServerException) as refused:
        _double(client, client_timeout=5)
    assert refused.value.status() == "StatusCode.UNAVAILABLE"


# ------------------------------------------------------------ tokens ---


@pytest.fixture(scope="module")
def token_server(repository: Path) -> Iterator[ServerThread]:
    with serve(repository, auth_token=INFERENCE_TOKEN, admin_token=ADMIN_TOKEN) as server:
        yield server


def _bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def test_inference_needs_the_inference_token(token_server: ServerThread) -> None:
    with token_server.client() as client:
        np.testing.assert_array_equal(
            _double(client, headers=_bearer(INFERENCE_TOKEN)), [[0, 2, 4, 6]]
        )
        with pytest.raises(InferenceServerException) as missing:
            _double(client)
        assert missing.value.status() == "StatusCode.UNAUTHENTICATED"
        assert "authorization: Bearer <token>" in missing.value.message()
        with pytest.raises(InferenceServerException) as wrong:
            _double(client, headers=_bearer(INFERENCE_TOKEN[:-1] + "X"))
        assert wrong.value.status() == "StatusCode.UNAUTHENTICATED"
        assert INFERENCE_TOKEN[:-1] not in wrong.value.message()
        # Metadata RPCs are inference-service calls too.
        with pytest.raises(InferenceServerException) as metadata:
            client.get_model_metadata("double")
        assert metadata.value.status() == "StatusCode.UNAUTHENTICATED"
        assert client.get_model_metadata("double", headers=_bearer(INFERENCE_TOKEN)).name == (
            "double"
        )


def test_health_stays_open_for_probes(token_server: ServerThread) -> None:
    with grpc.insecure_channel(token_server.url) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_management_needs_the_admin_token(token_server: ServerThread) -> None:
    with token_server.client() as client:
        with pytest.raises(InferenceServerException) as denied:
            client.load_model("double", headers=_bearer(INFERENCE_TOKEN))
        assert denied.value.status() == "StatusCode.PERMISSION_DENIED"
        with pytest.raises(InferenceServerException) as missing:
            client.unload_model("double")
        assert missing.value.status() == "StatusCode.UNAUTHENTICATED"
        with pytest.raises(InferenceServerException) as wrong:
            client.unload_model("double", headers=_bearer(ADMIN_TOKEN + "0"))
        assert wrong.value.status() == "StatusCode.UNAUTHENTICATED"
        # The admin token passes the guard (what happens next is model control's business).
        try:
            client.load_model("double", headers=_bearer(ADMIN_TOKEN))
        except InferenceServerException as error:
            assert error.status() not in (
                "StatusCode.UNAUTHENTICATED",
                "StatusCode.PERMISSION_DENIED",
            )
        # The admin token is not an inference token.
        with pytest.raises(InferenceServerException) as admin_for_inference:
            _double(client, headers=_bearer(ADMIN_TOKEN))
        assert admin_for_inference.value.status() == "StatusCode.UNAUTHENTICATED"


def test_tokens_over_http(token_server: ServerThread) -> None:
    url = token_server.http_url
    host, port = url.split(":")

    def call(method: str, path: str, body: str | None = None, token: str | None = None):  # type: ignore[no-untyped-def]
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            connection.request(method, path, body=body, headers=_bearer(token) if token else {})
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read().decode()
        finally:
            connection.close()

    status, headers, body = call("POST", "/v2/models/double/infer", _DOUBLE_JSON)
    assert status == 401 and headers.get("www-authenticate") == "Bearer"
    assert "authorization: Bearer <token>" in body
    assert call("POST", "/v2/models/double/infer", _DOUBLE_JSON, INFERENCE_TOKEN)[0] == 200
    status, _, body = call("POST", "/v2/models/double/infer", _DOUBLE_JSON, INFERENCE_TOKEN[:-1])
    assert status == 401 and INFERENCE_TOKEN[:-1] not in body
    assert call("GET", "/v2/models/double")[0] == 401  # metadata is an inference call too
    # Probes need no secret.
    assert call("GET", "/v2/health/ready")[0] == 200 and call("GET", "/v2/health/live")[0] == 200
    assert call("POST", "/v2/repository/models/double/load", "{}", INFERENCE_TOKEN)[0] == 403
    assert call("POST", "/v2/repository/models/double/unload", "{}", ADMIN_TOKEN)[0] not in (
        401,
        403,
    )
    with http_client(url) as client:
        assert client.get_model_metadata("double", headers=_bearer(INFERENCE_TOKEN))["name"] == (
            "double"
        )


def test_tokens_never_reach_the_log_or_the_settings_repr(repository: Path) -> None:
    settings = Settings(model_repository=repository, auth_token=INFERENCE_TOKEN)
    assert INFERENCE_TOKEN not in repr(settings)
    server = start_on_loopback(
        repository,
        "--log-level",
        "DEBUG",
        "--access-log",
        env={"BATCHWISE_AUTH_TOKEN": INFERENCE_TOKEN, "BATCHWISE_ADMIN_TOKEN": ADMIN_TOKEN},
    )
    try:
        with grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port()}") as client:
            _double(client, headers=_bearer(INFERENCE_TOKEN))
            with pytest.raises(InferenceServerException):
                _double(client, headers=_bearer(ADMIN_TOKEN))
            with pytest.raises(InferenceServerException):
                client.load_model("double", headers=_bearer(INFERENCE_TOKEN))
        server.wait_for("model=double")
    finally:
        server.kill()
    assert INFERENCE_TOKEN not in server.log and ADMIN_TOKEN not in server.log


# ------------------------------------------------------ bad settings ---


def _start(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "service",
            "serve",
            "--grpc-port",
            "0",
            "--metrics-port",
            "-1",
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_bad_tls_and_token_settings_fail_at_start_with_clear_messages(
    certificates: Certificates, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    only_cert = _start("--grpc-tls-cert", str(certificates.server.cert))
    assert only_cert.returncode == 2
    assert "grpc_tls_cert and grpc_tls_key go together" in only_cert.stderr
    ca_without_tls = _start("--grpc-tls-client-ca", str(certificates.ca))
    assert ca_without_tls.returncode == 2 and "needs TLS on" in ca_without_tls.stderr
    short = _start("--auth-token", "short")
    assert short.returncode == 2 and "at least 16" in short.stderr
    assert "short" not in short.stderr.replace("at least", "")
    missing = _start(
        "--grpc-tls-cert", str(tmp_path / "absent.crt"), "--grpc-tls-key", str(tmp_path / "k")
    )
    assert missing.returncode == 1 and "cannot read the TLS certificate" in missing.stderr
    mismatched = _start(
        "--grpc-tls-cert",
        str(certificates.server.cert),
        "--grpc-tls-key",
        str(certificates.client.key),
    )
    assert mismatched.returncode == 1
    assert "cannot be used together" in mismatched.stderr
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    garbage = _start("--grpc-tls-cert", str(not_pem), "--grpc-tls-key", str(not_pem))
    assert garbage.returncode == 1 and "is not PEM" in garbage.stderr


def test_front_end_processes_speak_tls(repository: Path, certificates: Certificates) -> None:
    """Each front end builds the same credentials; plaintext is refused there too."""
    server = start_on_loopback(
        repository,
        "--frontend-processes",
        "2",
        "--grpc-tls-cert",
        str(certificates.server.cert),
        "--grpc-tls-key",
        str(certificates.server.key),
        "--grpc-tls-client-ca",
        str(certificates.ca),
    )
    try:
        port = server.grpc_port()
        for _ in range(4):  # new connections, spread over the front ends
            with grpcclient.InferenceServerClient(
                f"localhost:{port}",
                ssl=True,
                root_certificates=str(certificates.ca),
                private_key=str(certificates.client.key),
                certificate_chain=str(certificates.client.cert),
                channel_args=[("grpc.use_local_subchannel_pool", 1)],
            ) as client:
                np.testing.assert_array_equal(_double(client), [[0, 2, 4, 6]])
        with (
            grpcclient.InferenceServerClient(f"127.0.0.1:{port}") as plaintext,
            pytest.raises(InferenceServerException),
        ):
            plaintext.is_server_live(client_timeout=5)
        http_port = server.http_port()
        for _ in range(4):
            status, _ = _https(
                http_port,
                certificates,
                "POST",
                "/v2/models/double/infer",
                _DOUBLE_JSON,
                certificates.client,
            )
            assert status == 200
        assert _plain_http_fails(http_port)
    finally:
        server.process.send_signal(signal.SIGTERM)
        assert server.wait_exit() == 0, server.log
