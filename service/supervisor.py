"""The server as several processes: one engine, N front ends, and this supervisor.

    batchwise serve --frontend-processes N      (N >= 1)

The supervisor starts the engine and the front ends, restarts a front end
that dies (only that front end's calls fail), and ends the server with exit 3
if the engine dies: the orchestrator then restarts the whole. On SIGTERM or
SIGINT it drains the front ends first (health NOT_SERVING, in-flight requests
answered), then stops the engine, and exits 0. Children report "listening" and
"loaded" on a pipe; "server ready" is logged once the models are loaded and
every front end listens. Nothing of the server's is left in /dev/shm afterwards:
slabs are unlinked once mapped, and the supervisor sweeps its prefix on exit.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import logging
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .settings import AUTO_FRONTENDS, FRONTENDS_MIN_CORES, Settings
from .shared_memory import SHM_ROOT
from .slabs import slab_prefix

log = logging.getLogger(__name__)

ENGINE_EXIT_CODE = 3
# How the supervisor asks a child to drain and stop. Children ignore SIGTERM and SIGINT,
# which a terminal or `timeout` sends to the whole process group: the supervisor alone
# decides the order (front ends first, then the engine).
STOP_SIGNAL = signal.SIGUSR1
# A front end that dies this often within RESTART_WINDOW_SECONDS is not restarted again.
MAX_RESTARTS = 5
RESTART_WINDOW_SECONDS = 30.0
POLL_SECONDS = 0.05
_PR_SET_PDEATHSIG = 1


def frontend_count(settings: Settings) -> int:
    """--frontend-processes, with -1 resolved from the cores this process may use, and
    from /dev/shm: the default never picks a layout that could not start (a container's
    /dev/shm is 64 MB unless it is given more)."""
    if settings.frontend_processes >= 0:
        return settings.frontend_processes
    if len(os.sched_getaffinity(0)) < FRONTENDS_MIN_CORES:
        return 0
    needed = 2 * AUTO_FRONTENDS * settings.frontend_slab_bytes
    try:
        free = shutil.disk_usage(SHM_ROOT).free
    except OSError:
        free = 0
    if free < needed:
        log.warning(
            "serving in one process: %s has %d bytes free and %d front-end processes need %d "
            "(--frontend-slab-bytes each way); give the container more shared memory or set "
            "--frontend-processes",
            SHM_ROOT,
            free,
            AUTO_FRONTENDS,
            needed,
        )
        return 0
    return AUTO_FRONTENDS


def _prepare_child() -> None:
    """In a child, before exec: killed when the supervisor goes, however it goes; deaf to
    the process group's SIGINT/SIGTERM; STOP_SIGNAL held (both survive exec) until the
    child can handle it, so a stop sent during its start-up is not its death."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    for ignored in (signal.SIGINT, signal.SIGTERM):
        signal.signal(ignored, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {STOP_SIGNAL})


def listen_for_stop(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """In a child: STOP_SIGNAL sets `stop`, including one that arrived during start-up."""
    loop.add_signal_handler(STOP_SIGNAL, stop.set)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {STOP_SIGNAL})


def _reserve_port(host: str) -> socket.socket:
    """Hold a free port for the front ends: bound with SO_REUSEPORT, never listening."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    holder = socket.socket(family, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind((host, 0))
    return holder


class _Child:
    def __init__(
        self, role: str, index: int, generation: int, process: subprocess.Popen[bytes]
    ) -> None:
        self.role = role
        self.index = index
        self.generation = generation
        self.process = process


class Supervisor:
    def __init__(self, settings: Settings, frontends: int) -> None:
        self.settings = settings
        self.frontends = frontends
        self.pid = os.getpid()
        self.runtime = Path(tempfile.mkdtemp(prefix="batchwise-"))
        self._port_holders: list[socket.socket] = []
        self.port = settings.grpc_port
        self.http_port = settings.http_port
        self._stop_requested = False
        self._status_read, self._status_write = os.pipe()
        os.set_blocking(self._status_read, False)
        self._status_buffer = b""
        self._listening: set[int] = set()
        self._loaded = ""
        self._announced = False
        self._restarts: dict[int, list[float]] = {}

    def _spawn(self, role: str, index: int = 0, generation: int = 0) -> _Child:
        command = [
            sys.executable,
            "-m",
            "service.supervisor",
            role,
            str(self.runtime),
            str(self.pid),
            str(self._status_write),
            str(index),
            str(generation),
        ]
        process = subprocess.Popen(
            command, pass_fds=(self._status_write,), preexec_fn=_prepare_child
        )
        return _Child(role, index, generation, process)

    def _request_stop(self, signum: int, frame: object) -> None:
        self._stop_requested = True

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        settings = self.settings
        try:
            # Free ports are picked here, once, so that every front end binds the same one.
            if settings.grpc_port == 0:
                holder = _reserve_port(settings.grpc_host)
                self._port_holders.append(holder)
                settings = dataclasses.replace(settings, grpc_port=holder.getsockname()[1])
            if settings.http_port == -1:
                holder = _reserve_port(settings.http_host)
                self._port_holders.append(holder)
                settings = dataclasses.replace(settings, http_port=holder.getsockname()[1])
            (self.runtime / "settings.pickle").write_bytes(pickle.dumps(settings))
            log.info(
                "starting the engine and %d front-end process(es) for port %d",
                self.frontends,
                settings.grpc_port,
            )
            self.port = settings.grpc_port
            self.http_port = settings.http_port
            return self._supervise()
        finally:
            self._sweep()

    def _supervise(self) -> int:
        engine = self._spawn("engine")
        frontends = {index: self._spawn("frontend", index) for index in range(self.frontends)}
        while not self._stop_requested:
            time.sleep(POLL_SECONDS)
            self._read_status()
            if engine.process.poll() is not None:
                log.error(
                    "the engine exited (status %s); stopping the server", engine.process.returncode
                )
                self._terminate(list(frontends.values()), 5.0)
                return ENGINE_EXIT_CODE
            for index, child in list(frontends.items()):
                if child.process.poll() is None:
                    continue
                if index not in self._listening and child.generation == 0:
                    log.error("front end %d could not start; stopping the server", index)
                    self._terminate([engine, *frontends.values()], 5.0)
                    return 1
                self._listening.discard(index)
                if not self._may_restart(index):
                    log.error("front end %d keeps exiting; stopping the server", index)
                    self._terminate([engine, *frontends.values()], 5.0)
                    return 1
                log.warning(
                    "front end %d exited (status %s); starting it again",
                    index,
                    child.process.returncode,
                )
                frontends[index] = self._spawn("frontend", index, child.generation + 1)
        log.info("shutting down: draining %d front end(s)", len(frontends))
        grace = self.settings.shutdown_grace_seconds
        self._terminate(list(frontends.values()), grace + 5.0)
        self._terminate([engine], grace + 10.0)
        code = engine.process.returncode
        log.info("server stopped")
        return 0 if code == 0 else ENGINE_EXIT_CODE

    def _may_restart(self, index: int) -> bool:
        now = time.monotonic()
        recent = [t for t in self._restarts.get(index, []) if now - t < RESTART_WINDOW_SECONDS]
        recent.append(now)
        self._restarts[index] = recent
        return len(recent) <= MAX_RESTARTS

    def _terminate(self, children: list[_Child], seconds: float) -> None:
        """STOP_SIGNAL, wait up to `seconds`, then SIGKILL what is left."""
        for child in children:
            if child.process.poll() is None:
                child.process.send_signal(STOP_SIGNAL)
        deadline = time.monotonic() + seconds
        for child in children:
            try:
                child.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s %d did not stop in time; killing it", child.role, child.index)
                child.process.kill()
                child.process.wait()
            self._read_status()

    def _read_status(self) -> None:
        try:
            self._status_buffer += os.read(self._status_read, 65536)
        except BlockingIOError:
            return
        *lines, self._status_buffer = self._status_buffer.split(b"\n")
        for line in lines:
            kind, _, detail = line.decode().partition(" ")
            if kind == "listening":
                self._listening.add(int(detail))
            elif kind == "loaded":
                self._loaded = detail
        if not self._announced and self._loaded and len(self._listening) == self.frontends:
            self._announced = True
            log.info(
                "server ready: %s; %d front-end processes listening on %s:%d (gRPC)%s",
                self._loaded,
                self.frontends,
                self.settings.grpc_host,
                self.port,
                f" and port {self.http_port} (HTTP)" if self.http_port else "",
            )

    def _sweep(self) -> None:
        prefix = slab_prefix(self.pid)
        for leftover in SHM_ROOT.glob(f"{prefix}*"):
            leftover.unlink(missing_ok=True)
        shutil.rmtree(self.runtime, ignore_errors=True)
        for holder in self._port_holders:
            holder.close()


def _child_main(argv: list[str]) -> int:
    """`python -m service.supervisor ROLE RUNTIME SUPERVISOR_PID STATUS_FD INDEX GENERATION`."""
    role, runtime_text, supervisor_text, status_text, index_text, generation_text = argv
    runtime = Path(runtime_text)
    supervisor_pid, status_fd = int(supervisor_text), int(status_text)
    index, generation = int(index_text), int(generation_text)
    for ignored in (signal.SIGINT, signal.SIGTERM):  # the supervisor decides when to stop
        signal.signal(ignored, signal.SIG_IGN)
    settings: Settings = pickle.loads((runtime / "settings.pickle").read_bytes())
    from .cli import run_event_loop
    from .logs import configure_logging

    configure_logging(settings.log_level_number, settings.log_format, settings.access_log)

    def report(line: str) -> None:
        os.write(status_fd, (line + "\n").encode())

    socket_path = runtime / "engine.sock"
    codes: list[int] = []
    if role == "engine":
        from .engine import run_engine

        run_event_loop(
            run_engine(settings, socket_path, supervisor_pid, report, codes), settings.event_loop
        )
    else:
        from .frontend import serve_frontend

        run_event_loop(
            serve_frontend(settings, index, generation, socket_path, supervisor_pid, report, codes),
            settings.event_loop,
        )
    return codes[0] if codes else 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
