"""The scheduler through the wire: batching, preferred sizes, queue policy, priorities,
deadlines, cancellation, ordering and padding.

The `sleepy_*` models spin for max(steps) loop trips without changing their
output, so a test can keep the single instance busy while it lines requests up
behind it, then check what the scheduler did with them. Nothing here measures
time; the checks are about order, grouping and status codes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests import onnx_models as models
from tests.conftest import ServerThread, serve

BUSY_STEPS = 300_000  # about 1.4 s of one busy instance
SHORT_STEPS = 20_000  # about 0.1 s: far apart enough to tell runs' order from answers' order
MODELS: dict[str, tuple[Callable[[], Any], str]] = {
    "batched": (
        models.sleepy_double,
        "max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 10000000 }\n",
    ),
    "preferred": (
        models.sleepy_double,
        "max_batch_size: 8\ndynamic_batching { preferred_batch_size: [ 4 ] }\n",
    ),
    "plain": (models.sleepy_double, "max_batch_size: 8\n"),
    "bounded": (
        models.sleepy_double,
        "max_batch_size: 1\ndynamic_batching { default_queue_policy { max_queue_size: 2 } }\n",
    ),
    "timeouts": (
        models.sleepy_double,
        "max_batch_size: 1\ndynamic_batching { "
        "default_queue_policy { default_timeout_microseconds: 100000 } }\n",
    ),
    "override": (
        models.sleepy_double,
        "max_batch_size: 1\ndynamic_batching { "
        "default_queue_policy { allow_timeout_override: true } }\n",
    ),
    "delayed": (
        models.sleepy_double,
        "max_batch_size: 1\ndynamic_batching { "
        "default_queue_policy { timeout_action: DELAY allow_timeout_override: true } }\n",
    ),
    "priorities": (
        models.sleepy_double,
        "max_batch_size: 1\ndynamic_batching { priority_levels: 2 default_priority_level: 2 }\n",
    ),
    "ordered": (
        models.sleepy_double,
        "max_batch_size: 8\ndynamic_batching { "
        "preserve_ordering: true }\ninstance_group [ { count: 2 } ]\n",
    ),
    "unordered": (
        models.sleepy_double,
        "max_batch_size: 8\ndynamic_batching { }\ninstance_group [ { count: 2 } ]\n",
    ),
    "gather": (models.sleepy_gather, "max_batch_size: 8\ndynamic_batching { }\n"),
    "delay_bounded": (
        models.sleepy_double,
        "max_batch_size: 1\ndynamic_batching { default_queue_policy { max_queue_size: 2 "
        "timeout_action: DELAY allow_timeout_override: true } }\n",
    ),
    "tokens": (
        models.sleepy_tokens,
        "max_batch_size: 16\ndynamic_batching { }\n"
        'parameters { key: "padding" value: { string_value: "tokens:0, mask:0" } }\n',
    ),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    root = tmp_path_factory.mktemp("batching")
    for name, (build, config) in MODELS.items():
        models.save(build(), root, name, config=config)
    with serve(root) as running:
        yield running


def double_inputs(rows: int, steps: int = 0, value: float = 1.0) -> list[grpcclient.InferInput]:
    x = grpcclient.InferInput("x", [rows, 4], "FP32")
    x.set_data_from_numpy(np.full((rows, 4), value, np.float32))
    s = grpcclient.InferInput("steps", [rows, 1], "INT64")
    s.set_data_from_numpy(np.full((rows, 1), steps, np.int64))
    return [x, s]


class Lineup:
    """Holds a model's only instance busy, then queues requests behind it."""

    def __init__(self, server: ServerThread, model: str) -> None:
        self.server = server
        self.model = model
        self.version = server.server.registry.resolve(model, "")
        self.pool = ThreadPoolExecutor(max_workers=32)
        self.finished: list[str] = []
        self._lock = threading.Lock()

    def _call(self, tag: str, inputs: list[grpcclient.InferInput], **options: Any) -> Any:
        with self.server.client() as client:
            try:
                result: Any = client.infer(self.model, inputs, request_id=tag, **options)
            except InferenceServerException as error:
                result = error
        with self._lock:
            self.finished.append(tag)
        return result

    def submit(self, tag: str, inputs: list[grpcclient.InferInput], **options: Any) -> Any:
        return self.pool.submit(self._call, tag, inputs, **options)

    def hold(self) -> Any:
        busy = self.submit("busy", double_inputs(1, BUSY_STEPS))
        self.wait_until(lambda: self.version.scheduler.running == self.version.scheduler.instances)
        return busy

    def wait_until(self, condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 30
        while not condition():
            assert time.monotonic() < deadline, "the server never reached the expected state"
            time.sleep(0.002)

    def wait_queued(self, count: int) -> None:
        self.wait_until(lambda: self.version.scheduler.queued_requests >= count)

    def stats(self) -> Any:
        return self.version.stats.snapshot()


def test_requests_that_queue_behind_a_busy_instance_run_as_one_batch(server: ServerThread) -> None:
    lineup = Lineup(server, "batched")
    before = lineup.stats()
    busy = lineup.hold()
    waiting = [lineup.submit(f"r{i}", double_inputs(1, value=i)) for i in range(8)]
    lineup.wait_queued(8)
    results = [future.result(60) for future in waiting]
    busy.result(60)
    for index, result in enumerate(results):
        np.testing.assert_array_equal(result.as_numpy("y"), np.full((1, 4), 2.0 * index))
    after = lineup.stats()
    assert after.execution_count - before.execution_count == 2  # the busy run + one batch of 8
    assert after.batches[8].compute_infer.count >= 1


def test_a_lone_request_does_not_wait_out_the_queue_delay(server: ServerThread) -> None:
    """max_queue_delay_microseconds is 10 s on `batched`; an idle model answers at once."""
    with server.client() as client:
        client.infer("batched", double_inputs(1))  # a run to learn from
        before = client.get_inference_statistics("batched").model_stats[0].inference_stats
        client.infer("batched", double_inputs(1))
        after = client.get_inference_statistics("batched").model_stats[0].inference_stats
    queued_ns = after.queue.ns - before.queue.ns
    assert after.queue.count - before.queue.count == 1
    assert queued_ns < 2_000_000_000, f"waited {queued_ns / 1e9:.1f} s of the 10 s delay"


def test_without_dynamic_batching_requests_run_one_by_one(server: ServerThread) -> None:
    lineup = Lineup(server, "plain")
    before = lineup.stats()
    busy = lineup.hold()
    waiting = [lineup.submit(f"r{i}", double_inputs(1)) for i in range(4)]
    lineup.wait_queued(4)
    for future in [*waiting, busy]:
        future.result(60)
    assert lineup.stats().execution_count - before.execution_count == 5


def test_preferred_batch_size_cuts_the_queue(server: ServerThread) -> None:
    lineup = Lineup(server, "preferred")
    before = lineup.stats()
    busy = lineup.hold()
    waiting = [lineup.submit(f"r{i}", double_inputs(1)) for i in range(6)]
    lineup.wait_queued(6)
    for future in [*waiting, busy]:
        future.result(60)
    after = lineup.stats()
    new = {
        size: after.batches[size].compute_infer.count
        - (before.batches[size].compute_infer.count if size in before.batches else 0)
        for size in after.batches
    }
    assert new.get(4) == 1 and new.get(2) == 1, new


def test_multi_row_requests_are_packed_whole(server: ServerThread) -> None:
    lineup = Lineup(server, "batched")
    before = lineup.stats()
    busy = lineup.hold()
    waiting = [lineup.submit(f"r{i}", double_inputs(3, value=i)) for i in range(3)]
    lineup.wait_queued(3)
    results = [future.result(60) for future in waiting]
    busy.result(60)
    for index, result in enumerate(results):
        np.testing.assert_array_equal(result.as_numpy("y"), np.full((3, 4), 2.0 * index))
    after = lineup.stats()
    sizes = {
        size
        for size in after.batches
        if after.batches[size].compute_infer.count
        > (before.batches[size].compute_infer.count if size in before.batches else 0)
    }
    assert sizes == {1, 6, 3}, sizes  # busy(1), then 3+3 (9 rows would exceed 8), then 3


def test_full_queue_is_rejected_at_once(server: ServerThread) -> None:
    lineup = Lineup(server, "bounded")
    busy = lineup.hold()
    queued = [lineup.submit(f"q{i}", double_inputs(1)) for i in range(2)]
    lineup.wait_queued(2)
    rejected = [lineup.submit(f"x{i}", double_inputs(1)) for i in range(3)]
    outcomes = [future.result(60) for future in rejected]
    # the rejections came back while the instance was still busy, not when it freed
    assert "busy" not in lineup.finished
    for outcome in outcomes:
        assert isinstance(outcome, InferenceServerException)
        assert outcome.status() == "StatusCode.UNAVAILABLE"
        assert "Exceeds maximum queue size" in outcome.message()
    for future in [*queued, busy]:
        assert not isinstance(future.result(60), InferenceServerException)


def test_queue_timeout_rejects(server: ServerThread) -> None:
    lineup = Lineup(server, "timeouts")
    busy = lineup.hold()
    late = lineup.submit("late", double_inputs(1)).result(60)
    assert isinstance(late, InferenceServerException)
    assert late.status() == "StatusCode.UNAVAILABLE"
    assert "Request timeout expired" in late.message()
    assert "busy" not in lineup.finished  # rejected when its timeout expired, not later
    busy.result(60)


def test_timeout_parameter_overrides_when_allowed(server: ServerThread) -> None:
    lineup = Lineup(server, "override")
    busy = lineup.hold()
    late = lineup.submit("late", double_inputs(1), timeout=100_000).result(60)
    patient = lineup.submit("patient", double_inputs(1))
    assert isinstance(late, InferenceServerException)
    assert "Request timeout expired" in late.message()
    assert not isinstance(patient.result(60), InferenceServerException)
    busy.result(60)


def test_delay_action_moves_expired_requests_behind_the_others(server: ServerThread) -> None:
    lineup = Lineup(server, "delayed")
    busy = lineup.hold()
    expired = lineup.submit("expired", double_inputs(1, SHORT_STEPS), timeout=1_000)
    lineup.wait_queued(1)
    time.sleep(0.05)  # let its 1 ms timeout pass while it waits
    fresh = lineup.submit("fresh", double_inputs(1, SHORT_STEPS))
    lineup.wait_queued(2)
    for future in (busy, expired, fresh):
        assert not isinstance(future.result(60), InferenceServerException)
    assert lineup.finished.index("fresh") < lineup.finished.index("expired")


def test_higher_priority_is_served_first(server: ServerThread) -> None:
    lineup = Lineup(server, "priorities")
    busy = lineup.hold()
    # Each queued run takes ~0.1 s, so the order of the answers is the order of the runs.
    low = [lineup.submit(f"low{i}", double_inputs(1, SHORT_STEPS)) for i in range(3)]
    lineup.wait_queued(3)
    high = lineup.submit("high", double_inputs(1, SHORT_STEPS), priority=1)
    lineup.wait_queued(4)
    for future in [busy, *low, high]:
        assert not isinstance(future.result(60), InferenceServerException)
    order = [tag for tag in lineup.finished if tag != "busy"]
    assert order[0] == "high", order


def test_priority_out_of_range(server: ServerThread) -> None:
    with server.client() as client, pytest.raises(InferenceServerException) as caught:
        client.infer("priorities", double_inputs(1), priority=3)
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "priority levels 1 to 2" in caught.value.message()


def test_expired_deadline_and_cancelled_requests_are_never_computed(server: ServerThread) -> None:
    lineup = Lineup(server, "batched")
    before = lineup.stats()
    busy = lineup.hold()
    expired = lineup.submit("expired", double_inputs(2), client_timeout=0.05)
    with server.client() as client:
        cancelled = client.async_infer("batched", double_inputs(3), callback=lambda r, e: None)
        lineup.wait_queued(2)
        cancelled.cancel()
    outcome = expired.result(60)
    assert isinstance(outcome, InferenceServerException)
    assert outcome.status() == "StatusCode.DEADLINE_EXCEEDED"
    busy.result(60)
    lineup.wait_until(lambda: lineup.version.scheduler.queued_requests == 0)
    after = lineup.stats()
    assert after.execution_count - before.execution_count == 1  # only the busy request ran
    assert after.inference_count - before.inference_count == 1


@pytest.mark.parametrize(("model", "in_order"), [("ordered", True), ("unordered", False)])
def test_preserve_ordering(server: ServerThread, model: str, in_order: bool) -> None:
    """Two instances: a slow request, then a fast one that finishes first on the other.

    With preserve_ordering the fast response is held until the slow one has been
    answered, so by the time the fast response reaches the client the server has
    already counted the slow request as a success; without it, it has not.
    """
    lineup = Lineup(server, model)
    successes = lineup.stats().success.count
    slow = lineup.submit("slow", double_inputs(1, BUSY_STEPS))
    lineup.wait_until(lambda: lineup.version.scheduler.running == 1)
    fast = lineup.submit("fast", double_inputs(1)).result(60)
    answered_when_fast_arrived = lineup.stats().success.count - successes
    assert not isinstance(fast, InferenceServerException)
    assert not isinstance(slow.result(60), InferenceServerException)
    assert answered_when_fast_arrived == (2 if in_order else 1)


def token_inputs(length: int, value: float, steps: int = 0) -> list[grpcclient.InferInput]:
    tokens = np.arange(length, dtype=np.float32) + value
    arrays = {"tokens": tokens[None, :], "mask": np.ones((1, length), np.float32)}
    inputs = []
    for name, array in arrays.items():
        tensor = grpcclient.InferInput(name, list(array.shape), "FP32")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    steps_input = grpcclient.InferInput("steps", [1, 1], "INT64")
    steps_input.set_data_from_numpy(np.array([[steps]], np.int64))
    return [*inputs, steps_input]


def test_variable_lengths_are_padded_together_and_cut_back(server: ServerThread) -> None:
    lineup = Lineup(server, "tokens")
    before = lineup.stats()
    busy = lineup.submit("busy", token_inputs(4, 0, BUSY_STEPS))
    lineup.wait_until(lambda: lineup.version.scheduler.running == 1)
    lengths = [10, 11, 12, 9, 50]  # 50 is too far from the others to share their batch
    waiting = [lineup.submit(f"r{i}", token_inputs(n, 100.0 * i)) for i, n in enumerate(lengths)]
    lineup.wait_queued(len(lengths))
    for index, (length, future) in enumerate(zip(lengths, waiting, strict=True)):
        result = future.result(60)
        tokens = np.arange(length, dtype=np.float32) + 100.0 * index
        np.testing.assert_array_equal(result.as_numpy("doubled"), 2 * tokens[None, :])
        np.testing.assert_allclose(result.as_numpy("mean"), [[tokens.mean()]], rtol=1e-6)
    busy.result(60)
    after = lineup.stats()
    assert after.execution_count - before.execution_count == 3  # busy, the four similar, the 50
    assert after.padded_elements > before.padded_elements  # 9, 10, 11 were padded to 12


def _staged_bytes(lineup: Lineup) -> list[int]:
    """What each instance thread holds in staging buffers (asked on those threads)."""
    runner = lineup.version.runner
    return lineup.version.scheduler.on_every_instance(lambda: runner.thread_staging().held_bytes)


def _one_batch_of_doubles(lineup: Lineup, size: int, base: float = 0.0) -> None:
    """`size` one-row requests queued behind a busy instance (so they run as one batch),
    each answered with twice its own value."""
    busy = lineup.hold()
    waiting = [lineup.submit(f"r{i}", double_inputs(1, value=base + i)) for i in range(size)]
    lineup.wait_queued(size)
    for index, future in enumerate(waiting):
        result = future.result(60)
        assert not isinstance(result, InferenceServerException), result
        np.testing.assert_array_equal(result.as_numpy("y"), np.full((1, 4), 2 * (base + index)))
    busy.result(60)


def test_a_shorter_padded_batch_in_a_reused_buffer_sees_none_of_the_earlier_batch(
    server: ServerThread,
) -> None:
    """A batch is merged into a buffer its instance thread keeps; a later, smaller
    batch takes the start of the same buffer. Its padding must be the pad value
    again, not the tokens and mask the longer batch left there."""
    lineup = Lineup(server, "tokens")
    held = []
    for lengths, base in (([40, 41, 42], 1000.0), ([5, 6, 7], 0.0)):
        before = lineup.stats()
        busy = lineup.submit("busy", token_inputs(4, 0, BUSY_STEPS))
        lineup.wait_until(lambda: lineup.version.scheduler.running == 1)
        waiting = [
            lineup.submit(f"r{i}", token_inputs(n, base + 100.0 * i)) for i, n in enumerate(lengths)
        ]
        lineup.wait_queued(len(lengths))
        for index, (length, future) in enumerate(zip(lengths, waiting, strict=True)):
            result = future.result(60)
            assert not isinstance(result, InferenceServerException), result
            tokens = np.arange(length, dtype=np.float32) + base + 100.0 * index
            np.testing.assert_array_equal(result.as_numpy("doubled"), 2 * tokens[None, :])
            np.testing.assert_allclose(result.as_numpy("mean"), [[tokens.mean()]], rtol=1e-6)
        busy.result(60)
        assert lineup.stats().execution_count - before.execution_count == 2  # busy + one batch
        held.append(_staged_bytes(lineup))
    # The buffers grew for the first batch (3 x 42 FP32 tokens and mask) and the second
    # batch ran in them, without growing them.
    assert held[0][0] >= 2 * 3 * 42 * 4
    assert held[1] == held[0]


def test_batches_of_changing_sizes_in_reused_buffers_keep_answers_apart(
    server: ServerThread,
) -> None:
    lineup = Lineup(server, "batched")
    held = []
    for size, base in ((6, 100.0), (2, 200.0), (8, 300.0), (3, 400.0)):
        before = lineup.stats()
        _one_batch_of_doubles(lineup, size, base)
        assert lineup.stats().execution_count - before.execution_count == 2
        held.append(_staged_bytes(lineup)[0])
    # x (4 FP32) and steps (1 INT64) per row: at least the 8 rows of the largest batch,
    # and no new buffer after it.
    assert held[2] >= 8 * (4 * 4 + 8)
    assert held[3] == held[2]


def test_with_staging_off_batches_are_merged_into_fresh_arrays(tmp_path: Path) -> None:
    build, config = MODELS["batched"]
    models.save(build(), tmp_path, "batched", config=config)
    with serve(tmp_path, staging_buffer_limit_bytes=0) as unstaged:
        lineup = Lineup(unstaged, "batched")
        _one_batch_of_doubles(lineup, 5)
        assert _staged_bytes(lineup) == [0]


def gather_inputs(ids: list[int], steps: int = 0) -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput("ids", [1, 2], "INT64")
    tensor.set_data_from_numpy(np.array([ids], np.int64))
    busy = grpcclient.InferInput("steps", [1, 1], "INT64")
    busy.set_data_from_numpy(np.array([[steps]], np.int64))
    return [tensor, busy]


def test_one_bad_request_does_not_fail_its_batch(server: ServerThread) -> None:
    """onnxruntime rejects the batch because of one request's ids; the others still answer."""
    lineup = Lineup(server, "gather")
    before = lineup.stats()
    busy = lineup.submit("busy", gather_inputs([0, 0], BUSY_STEPS))
    lineup.wait_until(lambda: lineup.version.scheduler.running == 1)
    good = [lineup.submit(f"good{i}", gather_inputs([i, i + 1])) for i in range(3)]
    bad = lineup.submit("bad", gather_inputs([1, 999]))
    lineup.wait_queued(4)
    for index, future in enumerate(good):
        result = future.result(60)
        assert not isinstance(result, InferenceServerException), result
        table = np.arange(40, dtype=np.float32).reshape(10, 4)
        np.testing.assert_array_equal(result.as_numpy("emb"), table[[index, index + 1]][None])
    failure = bad.result(60)
    assert isinstance(failure, InferenceServerException)
    assert "999" in failure.message()
    busy.result(60)
    after = lineup.stats()
    # busy run, the failed batch of four, then four single runs
    assert after.execution_count - before.execution_count == 6
    assert after.success.count - before.success.count == 4


def test_delayed_requests_still_count_toward_max_queue_size(server: ServerThread) -> None:
    lineup = Lineup(server, "delay_bounded")
    busy = lineup.hold()
    delayed = [lineup.submit(f"d{i}", double_inputs(1), timeout=1_000) for i in range(2)]
    lineup.wait_queued(2)
    time.sleep(0.05)  # both 1 ms timeouts pass: they move behind everything else
    refused = lineup.submit("third", double_inputs(1)).result(60)
    assert isinstance(refused, InferenceServerException)
    assert "Exceeds maximum queue size" in refused.message()
    for future in [busy, *delayed]:
        assert not isinstance(future.result(60), InferenceServerException)


def test_a_gpu_instance_without_page_locked_memory_merges_in_ordinary_memory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a GPU model does where the CUDA runtime cannot pin memory, on this GPU-less
    machine: the session is made to say it runs on GPU 0, so the instance asks for
    page-locked staging, is refused (no GPU, or no CUDA runtime to ask), and serves from
    ordinary memory, saying why."""
    from service import pinned

    monkeypatch.setattr(pinned, "_shared", None)  # ask the CUDA runtime afresh
    build, config = MODELS["batched"]
    models.save(build(), tmp_path, "batched", config=config)
    with serve(tmp_path, warmup="off") as server:
        lineup = Lineup(server, "batched")
        monkeypatch.setattr(lineup.version.sessions[0], "gpu", 0)
        with caplog.at_level(logging.WARNING):
            _one_batch_of_doubles(lineup, 4)
        runner = lineup.version.runner
        (area,) = lineup.version.scheduler.on_every_instance(runner.thread_staging)
    assert not area.pinned and area.held_bytes > 0
    refused = "staging in ordinary memory instead" in caplog.text
    unreachable = "GPU batches are staged in ordinary memory: no CUDA runtime" in caplog.text
    assert refused or unreachable, caplog.text
