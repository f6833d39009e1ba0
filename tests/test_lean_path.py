"""The request path's fast lanes, through the wire: a lone request run on the event loop,
batches formed by the instance threads under load, threads chosen at load.

Which lane a request took is read from the scheduler's own count of runs made on
the event loop; what the client sees (its answer, its status) is checked for
every request.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
from onnx import TensorProto, helper

from service import onnx_ops
from service.batching.costs import CostModel
from service.threads import SMALL_RUN_NS, Threads, plan, settle, usable_cores
from tests import onnx_models as models
from tests.conftest import ServerThread, serve
from tests.process import start_on_loopback

BATCHING = "max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 5000 }\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    root = tmp_path_factory.mktemp("lean")
    models.save(models.scale(2.0, ["batch", 4]), root, "small", config=BATCHING)
    models.save(models.sleepy_double(), root, "looping", config=BATCHING)
    models.save(models.scale(2.0, ["batch", "width"]), root, "wide", config=BATCHING)
    with serve(root) as running:
        yield running


def _x(value: float, rows: int = 1) -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput("x", [rows, 4], "FP32")
    tensor.set_data_from_numpy(np.full((rows, 4), value, np.float32))
    return [tensor]


def test_lone_requests_run_on_the_event_loop_and_get_their_own_answers(
    server: ServerThread,
) -> None:
    scheduler = server.server.registry.resolve("small", "").scheduler
    before = scheduler.inline_runs
    with server.client() as client:
        for index in range(30):
            result = client.infer("small", _x(float(index)))
            np.testing.assert_array_equal(result.as_numpy("y"), np.full((1, 4), 2.0 * index))
    # The first request has no measured run time yet and goes to an instance thread.
    assert scheduler.inline_runs - before >= 20
    stats = server.server.registry.resolve("small", "").stats.snapshot()
    assert stats.fail.count == 0


def test_under_concurrent_load_batches_form_and_each_answer_is_its_own(tmp_path: Path) -> None:
    """In a server process of its own, so that the clients' threads do not share its GIL."""
    model = models.slow_matmul(1024, 24)  # about a millisecond a row: requests queue behind it
    # One thread, stated: a run timed at load near the 1 ms line could otherwise give the
    # model narrow one-row runs under load, which never batch.
    one_thread = 'parameters { key: "intra_op_thread_count" value: { string_value: "1" } }\n'
    models.save(model, tmp_path, "matmul", config=BATCHING + one_thread)
    weights = onnx.numpy_helper.to_array(model.graph.initializer[0])

    inputs = np.random.default_rng(0).standard_normal((16, 12, 1, 1024)).astype(np.float32)
    expected = inputs.copy()
    for _ in range(24):  # computed before the load, so the clients only send and compare
        expected = expected @ weights

    def send(worker: int) -> None:
        with grpcclient.InferenceServerClient(url) as client:
            for index in range(12):
                tensor = grpcclient.InferInput("x", [1, 1024], "FP32")
                tensor.set_data_from_numpy(inputs[worker, index])
                y = client.infer("matmul", [tensor]).as_numpy("y")
                np.testing.assert_allclose(y, expected[worker, index], rtol=1e-4, atol=1e-4)

    server = start_on_loopback(tmp_path)
    url = f"127.0.0.1:{server.grpc_port()}"
    try:
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(send, range(16)))
        with grpcclient.InferenceServerClient(url) as client:
            stats = client.get_inference_statistics("matmul", as_json=True)["model_stats"][0]
    finally:
        server.kill()
    assert int(stats["inference_stats"]["success"]["count"]) == 16 * 12
    assert int(stats["execution_count"]) < 16 * 12  # requests that queued together ran together
    assert any(int(entry["batch_size"]) > 1 for entry in stats["batch_stats"])


def test_a_request_of_a_size_never_timed_does_not_borrow_a_small_ones_estimate(
    server: ServerThread,
) -> None:
    """Small requests of a model with a dynamic width run on the loop; a wider one,
    whose run could take far longer, goes to an instance thread until its own size
    has been timed."""
    scheduler = server.server.registry.resolve("wide", "").scheduler

    def infer(client: grpcclient.InferenceServerClient, width: int, value: float) -> None:
        tensor = grpcclient.InferInput("x", [1, width], "FP32")
        tensor.set_data_from_numpy(np.full((1, width), value, np.float32))
        y = client.infer("wide", [tensor]).as_numpy("y")
        np.testing.assert_array_equal(y, np.full((1, width), 2.0 * value))

    with server.client() as client:
        for index in range(20):
            infer(client, 4, float(index))
        assert scheduler.inline_runs > 0
        before = scheduler.inline_runs
        for index in range(5):
            infer(client, 250_000 + index, float(index))  # a width not seen before, each time
        assert scheduler.inline_runs == before


def test_a_model_with_control_flow_never_runs_on_the_event_loop(server: ServerThread) -> None:
    scheduler = server.server.registry.resolve("looping", "").scheduler
    with server.client() as client:
        for index in range(10):
            x = grpcclient.InferInput("x", [1, 4], "FP32")
            x.set_data_from_numpy(np.full((1, 4), index, np.float32))
            steps = grpcclient.InferInput("steps", [1, 1], "INT64")
            steps.set_data_from_numpy(np.zeros((1, 1), np.int64))
            result = client.infer("looping", [x, steps])
            np.testing.assert_array_equal(result.as_numpy("y"), np.full((1, 4), 2.0 * index))
    assert scheduler.inline_runs == 0


def test_runs_on_the_event_loop_can_be_turned_off(tmp_path: Path) -> None:
    models.save(models.scale(3.0, ["batch", 4]), tmp_path, "small", config=BATCHING)
    with serve(tmp_path, inline_lone_requests=False, linger_microseconds=0) as running:
        with running.client() as client:
            for index in range(10):
                result = client.infer("small", _x(float(index)))
                np.testing.assert_array_equal(result.as_numpy("y"), np.full((1, 4), 3.0 * index))
        assert running.server.registry.resolve("small", "").scheduler.inline_runs == 0


def test_the_thread_choice_is_measured_and_logged_at_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    models.save(models.scale(2.0, ["batch", 4]), tmp_path, "tiny", config=BATCHING)
    models.save(models.slow_matmul(1024, 64), tmp_path, "heavy", config=BATCHING)
    models.save(
        models.scale(2.0, ["batch", 4]),
        tmp_path,
        "pinned",
        config=BATCHING
        + 'parameters { key: "intra_op_thread_count" value: { string_value: "2" } }\n',
    )
    with caplog.at_level(logging.INFO, logger="service.sessions"), serve(tmp_path):
        pass
    lines = {
        name: next(r.getMessage() for r in caplog.records if f"model '{name}'" in r.getMessage())
        for name in ("tiny", "heavy", "pinned")
    }
    assert "intra-op threads 1, no spinning (a single-row run took" in lines["tiny"]
    assert "intra-op threads 2, spinning during runs" in lines["pinned"]
    assert "took" not in lines["pinned"]  # the model's parameter decides: nothing to measure
    cores = usable_cores()
    if cores > 1:
        assert (
            f"intra-op threads {cores}, spinning during runs (a single-row run took"
            in lines["heavy"]
        )


def test_a_model_on_several_threads_runs_one_thread_per_instance_under_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    if usable_cores() < 2:
        pytest.skip("one core: every session gets one thread, there is nothing to narrow")
    depth = 256  # hundreds of millions of multiply-adds a row: far over 1 ms on any CPU
    model = models.slow_matmul(1024, depth)
    models.save(model, tmp_path, "heavy", config=BATCHING)
    weights = onnx.numpy_helper.to_array(model.graph.initializer[0])
    with caplog.at_level(logging.INFO, logger="service.sessions"), serve(tmp_path) as running:
        version = running.server.registry.resolve("heavy", "")
        assert version.runner.has_narrow, caplog.text
        assert version.scheduler.instances == usable_cores()
        assert f"{usable_cores()} instances, each on one thread" in caplog.text

        def send(worker: int) -> None:
            x = np.random.default_rng(worker).standard_normal((1, 1024)).astype(np.float32)
            tensor = grpcclient.InferInput("x", [1, 1024], "FP32")
            tensor.set_data_from_numpy(x)
            expected = x
            for _ in range(depth):
                expected = expected @ weights
            with running.client() as client:
                for _ in range(4):
                    y = client.infer("heavy", [tensor]).as_numpy("y")
                    np.testing.assert_allclose(y, expected, rtol=1e-3, atol=1e-3)

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(send, range(8)))
        assert version.runner.narrow_runs > 0


def test_the_event_loop_is_uvloop_unless_asked_otherwise(tmp_path: Path) -> None:
    models.save(models.scale(2.0, ["batch", 4]), tmp_path, "small", config=BATCHING)
    for flags, expected in (
        ((), "event loop: uvloop"),
        (("--event-loop", "asyncio"), "event loop: asyncio"),
    ):
        server = start_on_loopback(tmp_path, *flags)
        try:
            server.wait_for(expected)
            with grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port()}") as client:
                result = client.infer("small", _x(1.5))
                np.testing.assert_array_equal(result.as_numpy("y"), np.full((1, 4), 3.0))
        finally:
            server.kill()


# ----------------------------------------------------------- the parts alone ---


def test_onnx_ops_finds_operators_in_subgraphs(tmp_path: Path) -> None:
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Relu", ["v_in"], ["v_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [4]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [4]),
        ],
    )
    branch = helper.make_graph(
        [helper.make_node("Loop", ["trips", "", "x"], ["y"], body=body)],
        "branch",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    other = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["y"])],
        "other",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["flag"], ["y"], then_branch=branch, else_branch=other)],
        "main",
        [
            helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
            helper.make_tensor_value_info("trips", TensorProto.INT64, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph), str(path))
    assert onnx_ops.op_types(path) == {"If", "Loop", "Identity", "Relu", "Neg"}
    plain = tmp_path / "plain.onnx"
    onnx.save(models.slow_matmul(8, 2), str(plain))
    assert onnx_ops.op_types(plain) == {"MatMul"}
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x0a\xff\xff\xff\xff\x0f")  # a field longer than the file
    with pytest.raises(ValueError):
        onnx_ops.op_types(broken)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    assert onnx_ops.op_types(empty) == set()


def test_thread_plans() -> None:
    # Nothing given: a CPU session gets its share of the cores, to be confirmed by a run.
    assert plan(None, None, False, 1, cores=8) == Threads(8, True, True, measure=True)
    assert plan(None, None, False, 4, cores=8) == Threads(2, True, True, measure=True)
    assert plan(None, None, False, 1, cores=1) == Threads(1, False, True, measure=False)
    # What the model or the flags give is taken as it is.
    assert plan(3, None, False, 1, cores=8) == Threads(3, True, True)
    assert plan(None, False, False, 1, cores=8) == Threads(8, False, measure=True)
    assert plan(2, True, False, 1, cores=8) == Threads(2, True)
    # GPU sessions: onnxruntime's default threads, no spinning unless asked.
    assert plan(None, None, True, 1, cores=8) == Threads(0, False)
    measured = plan(None, None, False, 1, cores=8)
    assert settle(measured, SMALL_RUN_NS // 2) == Threads(1, False)
    assert settle(measured, SMALL_RUN_NS * 2) == measured
    assert settle(measured, None) == measured
    assert settle(Threads(2, True), 10) == Threads(2, True)


def test_cost_model_fits_the_window_it_keeps() -> None:
    model = CostModel()
    assert model.fit() is None
    for _ in range(10):
        model.add(4, 5000)
    assert model.fit() is None  # one work size: fixed and per-row cost are inseparable
    rng = np.random.default_rng(0)
    runs = [(int(w), int(1000 + 250 * w)) for w in rng.choice([1, 2, 4, 8, 16], 300)]
    for work, ns in runs:
        model.add(work, ns)
    fitted = model.fit()
    assert fitted is not None
    fixed, per_unit = fitted
    assert fixed == pytest.approx(1000, rel=1e-6)
    assert per_unit == pytest.approx(250, rel=1e-6)
    # The fit covers only the latest runs: a model that got slower is seen as slower.
    for work, _ in runs[:64]:
        model.add(work, 3000 + 500 * work)
    fixed, per_unit = model.fit() or (0.0, 0.0)
    assert fixed == pytest.approx(3000, rel=1e-6)
    assert per_unit == pytest.approx(500, rel=1e-6)
