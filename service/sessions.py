"""Opening a model version's onnxruntime sessions: devices, threads, and what its runs cost.

Placement (`placement`) says which devices and how many instances; this
module picks the threads (`threads`: the model's parameters, else the server's
flags, else a choice confirmed by timing one run), opens one session per
device, and says whether a lone request may run on the event loop (a CPU model
without control flow, whose run time follows from its input shapes alone).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from . import onnx_ops
from .placement import Placement
from .protocol import model_config_pb2 as mc
from .runtime import OnnxSession, session_options, thread_parameters
from .settings import Settings
from .threads import Threads, single_row_run_ns, timed_length
from .threads import plan as plan_threads
from .threads import settle as settle_threads
from .warmup import feeds_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OpenedSessions:
    sessions: list[OnnxSession]
    threads: Threads
    # A lone request may run on the event loop (Scheduler inline runs).
    inline_runs: bool
    # Instances (runs at once) per device.
    instances_per_device: int
    # CPU only: a one-thread session for runs made while another run is in progress.
    narrow: OnnxSession | None = None


def open_sessions(
    model_path: Path,
    model_dir: Path,
    config: mc.ModelConfig,
    placement: Placement,
    settings: Settings,
    label: str,
    count_given: bool,
) -> OpenedSessions:
    """`count_given`: the model's own config sets its instance count."""
    threads = _planned_threads(config, placement, settings)

    def open_all(threads: Threads) -> list[OnnxSession]:
        options = session_options(config, model_dir, threads)
        return [
            OnnxSession(
                model_path,
                options,
                device,
                io_binding=settings.cuda_io_binding,
                fallback_to_cpu=placement.cpu_fallback,
            )
            for device in placement.devices
        ]

    sessions = open_all(threads)
    on_gpu = sessions[0].on_gpu
    timing = ""
    if threads.measure and not on_gpu:
        took = _single_row_run_ns(sessions[0])
        chosen = settle_threads(threads, took)
        if chosen != threads:
            threads = chosen
            sessions = open_all(threads)
        if took is not None:
            timing = f" (a single-row run took {took / 1e6:.2f} ms)"
    instances = placement.instances_per_device
    narrow = None
    if (
        settings.narrow_sessions
        and threads.measure
        and threads.intra_op > 1
        and not on_gpu
        and not count_given
    ):
        # Several runs at once each on one core beat one after the other on every core.
        instances = max(instances, threads.intra_op)
        narrow = open_all(Threads(1, False))[0]
        timing += (
            f"; {instances} instances, each on one thread while more than one batch runs "
            "(a second, one-thread session)"
        )
    log.info("%s: %s%s", label, threads.describe(), timing)
    inline = settings.inline_lone_requests and not on_gpu and _runs_take_fixed_time(model_path)
    return OpenedSessions(sessions, threads, inline, instances, narrow)


def _planned_threads(config: mc.ModelConfig, placement: Placement, settings: Settings) -> Threads:
    """The model's thread parameters, else the server's flags, else the server's choice."""
    intra, spinning = thread_parameters(config)
    if intra is None and settings.onnxruntime_intra_op_threads:
        intra = settings.onnxruntime_intra_op_threads
    if spinning is None and settings.onnxruntime_spinning != "auto":
        spinning = settings.onnxruntime_spinning == "on"
    return plan_threads(intra, spinning, placement.on_gpu, placement.instances_per_device)


def _single_row_run_ns(session: OnnxSession) -> int | None:
    """How long one row takes on this session (variable dims at a middling length)."""
    graph = session.graph
    batching = bool(graph.inputs) and all(t.shape[:1] == (None,) for t in graph.inputs)
    try:
        feeds = feeds_for(graph, batching, 1, timed_length())
    except ValueError:
        return None
    return single_row_run_ns(session, feeds, [tensor.name for tensor in graph.outputs])


def _runs_take_fixed_time(model_path: Path) -> bool:
    """Whether the model's run time depends only on input shapes (no control flow)."""
    try:
        return not onnx_ops.op_types(model_path) & onnx_ops.CONTROL_FLOW
    except (OSError, ValueError) as error:  # ORT loaded it; an odd file is just not inlined
        log.debug("could not list the operators of %s: %s", model_path.name, error)
        return False
