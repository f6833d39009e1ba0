"""What the server admits, whether it is ready, and whether a request has it to itself.

One `ServerState` per server, used on the event loop thread only. Besides
readiness, draining and the `--max-requests-in-flight` limit, it tells a lone
request (the only one the server has, arriving at an idle server) from one of
many. A lone request on a small CPU model runs right on the event loop
(`Scheduler.infer`), skipping two thread hand-offs that would cost more than
the run. After answering one, the loop keeps polling for a moment instead of
sleeping (`linger`): a closed-loop client's next request usually comes within
a fraction of a millisecond, and a sleeping CPU (on a virtual machine above
all) takes longer to wake than that.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

from .errors import ServerUnavailableError


class Loading(Protocol):
    """Where readiness comes from: the model registry, or a front end's copy of it."""

    @property
    def loading_done(self) -> bool: ...

    def all_ready(self) -> bool: ...


# The event loop must have slept at least this long since the server last had nothing in
# flight for a new request to count as alone: under load it never sleeps.
QUIET_SLEEP_NS = 200_000
# A request that arrives while the loop is lingering with nothing else to do (two polls in a row
# this close together, the latest this recent) is alone. Under load, polls are interleaved with
# gRPC's work on the calls that wait, far longer than this gap.
_IDLE_POLL_GAP_NS = 50_000
_LINGER_FRESH_NS = 100_000
# A drain ends only after this long without a new request (see ServerState.wait_quiet).
QUIET_BEFORE_STOP_NS = 200_000_000


class ServerState:
    """Readiness, admission and in-flight accounting, as the protocol and health report them."""

    def __init__(
        self,
        registry: Loading,
        strict: bool,
        max_in_flight: int = 0,
        linger_ns: int = 0,
    ) -> None:
        """`linger_ns`: how long the loop keeps polling after answering a lone request."""
        self._registry = registry
        self._linger_ns = linger_ns
        self._strict = strict
        self._max_in_flight = max_in_flight
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        # When the server last had no inference request in flight: wall clock and the
        # event loop thread's CPU clock (both ns).
        self._quiet_since_ns = 0
        self._quiet_cpu_ns = 0
        # Lingering: polling until this time; when the latest poll ran, and the latest one
        # that followed another poll with nothing in between (ns).
        self._linger_until_ns = 0
        self._polled_ns = 0
        self._idle_poll_ns = 0
        self._lingering = False
        # When a request last arrived (and was refused) while draining (ns).
        self._refused_while_draining_ns = 0

    def request_started(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def request_finished(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()
            self._quiet_since_ns = time.perf_counter_ns()
            self._quiet_cpu_ns = time.thread_time_ns()

    def alone(self) -> bool:
        """Whether the one request in flight found the server idle.

        Calls that gRPC has received but not yet handed to a handler are not
        counted in flight: under load, one request at a time can be in flight
        while the next ones wait inside gRPC. What tells the two apart is
        whether the event loop waited for the network (slept, or lingered with
        nothing to do) since the server last had nothing in flight; under load
        its time goes to gRPC's work on the calls that wait.
        """
        if self.in_flight != 1:
            return False
        now = time.perf_counter_ns()
        if self._lingering and now - self._idle_poll_ns < _LINGER_FRESH_NS:
            return True
        busy = time.thread_time_ns() - self._quiet_cpu_ns
        return now - self._quiet_since_ns - busy > QUIET_SLEEP_NS

    def linger(self) -> None:
        """After a lone request: poll the loop for a moment while nothing is in flight."""
        if not self._linger_ns:
            return
        self._linger_until_ns = time.perf_counter_ns() + self._linger_ns
        if not self._lingering:
            self._lingering = True
            asyncio.get_running_loop().call_soon(self._poll)

    def _poll(self) -> None:
        now = time.perf_counter_ns()
        if self.in_flight == 0 and now < self._linger_until_ns and not self.draining:
            if now - self._polled_ns < _IDLE_POLL_GAP_NS:
                self._idle_poll_ns = now
            self._polled_ns = now
            asyncio.get_running_loop().call_soon(self._poll)
        else:
            self._lingering = False

    async def wait_idle(self) -> None:
        """Return once no inference request is in flight."""
        await self._idle.wait()

    async def wait_quiet(self, deadline: float) -> None:
        """While draining, return once no request has arrived for QUIET_BEFORE_STOP_NS (or
        at `deadline`, loop time). gRPC cancels the calls it has received but not yet handed
        to the server when it stops (clients see CANCELLED, which they do not retry); until
        the clients have heard UNAVAILABLE and stopped sending, the server keeps answering."""
        loop = asyncio.get_running_loop()
        waiting_since = time.perf_counter_ns()  # answers just sent bring new requests
        while loop.time() < deadline:
            latest = max(self._refused_while_draining_ns, waiting_since)
            quiet_for = time.perf_counter_ns() - latest
            if quiet_for >= QUIET_BEFORE_STOP_NS:
                return
            await asyncio.sleep((QUIET_BEFORE_STOP_NS - quiet_for) / 1e9)

    @property
    def ready(self) -> bool:
        if self.draining or not self._registry.loading_done:
            return False
        return self._registry.all_ready() if self._strict else True

    def check_accepting(self) -> None:
        if self.draining:
            raise ServerUnavailableError("the server is shutting down")
        if not self._registry.loading_done:
            raise ServerUnavailableError("the server is still loading models")

    def admit_inference(self) -> None:
        """Refuse an inference request the server cannot take now, before it is decoded."""
        if self.draining:
            self._refused_while_draining_ns = time.perf_counter_ns()
        self.check_accepting()
        if self._max_in_flight and self.in_flight >= self._max_in_flight:
            # A flood cannot pile up decoded tensors in memory.
            raise ServerUnavailableError(
                f"the server is at its limit of {self._max_in_flight} requests in flight "
                "(--max-requests-in-flight); retry later"
            )
