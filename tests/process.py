"""Running the server as a real process, the way users and orchestrators do."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LISTENING = re.compile(r"gRPC server listening on [\d.]+:(\d+)")
HTTP_LISTENING = re.compile(r"HTTP server listening on https?://[\d.]+:(\d+)")
METRICS = re.compile(r"metrics endpoint listening on http://[\d.]+:(\d+)/metrics")
READY = "server ready:"


class ServerProcess:
    """`python -m service serve ...` with its log captured line by line."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service", *args],
            cwd=ROOT,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        with self.process.stdout:
            for line in self.process.stdout:
                self.lines.append(line.rstrip("\n"))

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, text: str | re.Pattern[str], timeout: float = 60) -> re.Match[str] | str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if isinstance(text, re.Pattern):
                    found = text.search(line)
                    if found:
                        return found
                elif text in line:
                    return line
            if self.process.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"server log never showed {text!r}; log so far:\n{self.log}")

    def grpc_port(self) -> int:
        match = self.wait_for(LISTENING)
        assert isinstance(match, re.Match)
        return int(match.group(1))

    def http_port(self) -> int:
        match = self.wait_for(HTTP_LISTENING)
        assert isinstance(match, re.Match)
        return int(match.group(1))

    def metrics_port(self) -> int:
        match = self.wait_for(METRICS)
        assert isinstance(match, re.Match)
        return int(match.group(1))

    def wait_exit(self, timeout: float = 60) -> int:
        code = self.process.wait(timeout)
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        self._reader.join(5)


def start_on_loopback(
    repository: Path, *flags: str, env: dict[str, str] | None = None
) -> ServerProcess:
    """A server process on 127.0.0.1, free gRPC and HTTP ports, metrics off, once it
    reports ready."""
    server = launch_on_loopback(repository, *flags, env=env)
    server.wait_for("server ready")
    return server


def launch_on_loopback(
    repository: Path, *flags: str, env: dict[str, str] | None = None
) -> ServerProcess:
    """The same, without waiting: for a server that is expected not to start."""
    return ServerProcess(
        "serve",
        "--model-repository",
        str(repository),
        "--grpc-host",
        "127.0.0.1",
        "--grpc-port",
        "0",
        "--http-host",
        "127.0.0.1",
        "--http-port",
        "-1",
        "--metrics-port",
        "-1",
        *flags,
        env=env,
    )
