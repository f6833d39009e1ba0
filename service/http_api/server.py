"""The HTTP port: uvicorn (httptools' parser) serving the routes on this event loop.

uvicorn runs inside the process's own loop, beside grpc.aio, so an HTTP
request reaches the same schedulers as a gRPC one without a hop. The server
binds its socket itself: front-end processes share one port (SO_REUSEPORT) as
they do for gRPC. Signals stay with the process (service.app), which stops
this server once the drain is over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Iterator

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..errors import StartupError
from ..grpc_api.auth import TokenGuard
from ..grpc_api.servicer import RpcImplementation
from ..settings import Settings
from .routes import HttpApi

log = logging.getLogger(__name__)

# The request line and headers of one request, together; the body is bounded apart.
MAX_HEADER_BYTES = 64 * 1024
# A connection with no request in progress is closed after this long.
KEEP_ALIVE_SECONDS = 75


class _HeadersTooLargeError(Exception):
    pass


class BoundedHeadersProtocol(HttpToolsProtocol):
    """httptools puts no bound on headers; a request whose request line and headers pass
    MAX_HEADER_BYTES is answered 400 and its connection closed."""

    _header_bytes = 0

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        super().on_header(name, value)

    def _count(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > MAX_HEADER_BYTES:
            raise _HeadersTooLargeError  # httptools reports it as a parser error: 400, closed


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handlers: the process drains on its own signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _listening_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, and TCP_NODELAY set here (accepted sockets inherit it): asyncio sets
    # no-delay only on sockets that name the protocol, and an answer's headers and body are
    # two writes, which Nagle's algorithm would hold for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise StartupError(f"cannot listen for HTTP on {host}:{port}: {error.strerror}") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class HttpEndpoint:
    """The HTTP/REST port of one process (the one-process server or a front end)."""

    def __init__(self, settings: Settings, rpcs: dict[str, RpcImplementation]) -> None:
        self._settings = settings
        guard = TokenGuard(settings.auth_token, settings.admin_token)
        self.app = HttpApi(rpcs, guard, settings.max_message_bytes)
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None
        self.port = 0

    @property
    def scheme(self) -> str:
        return "https" if self._settings.grpc_tls_cert is not None else "http"

    def _config(self) -> uvicorn.Config:
        settings = self._settings
        tls: dict[str, object] = {}
        if settings.grpc_tls_cert is not None:
            tls = {"ssl_certfile": settings.grpc_tls_cert, "ssl_keyfile": settings.grpc_tls_key}
            if settings.grpc_tls_client_ca is not None:
                tls["ssl_ca_certs"] = settings.grpc_tls_client_ca
                tls["ssl_cert_reqs"] = ssl.CERT_REQUIRED
        return uvicorn.Config(
            self.app,
            http=BoundedHeadersProtocol,
            ws="none",
            lifespan="off",
            interface="asgi3",
            log_config=None,
            access_log=False,  # the inference access log covers HTTP requests too
            server_header=False,
            limit_concurrency=settings.http_max_connections,
            timeout_keep_alive=KEEP_ALIVE_SECONDS,
            **tls,  # type: ignore[arg-type]
        )

    async def start(self, reuse_port: bool = False) -> int:
        """Bind and serve; returns the port."""
        settings = self._settings
        port = 0 if settings.http_port == -1 else settings.http_port
        sock = _listening_socket(settings.http_host, port, reuse_port)
        try:
            config = self._config()
            config.load()
        except (OSError, ssl.SSLError) as error:
            sock.close()
            raise StartupError(f"cannot serve HTTP with TLS: {error}") from None
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        self.port = sock.getsockname()[1]
        self._server = _EmbeddedServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise StartupError(f"the HTTP server on port {self.port} stopped at start")
            await asyncio.sleep(0.005)
        return self.port

    async def stop(self, grace_seconds: float) -> None:
        """Close the port; requests in progress get `grace_seconds` to be answered."""
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout=grace_seconds)
        except TimeoutError:
            self._server.force_exit = True
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._task, timeout=1.0)
