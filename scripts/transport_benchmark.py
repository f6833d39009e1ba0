"""The server's cost per large request when the model costs nothing: transport and decoding.

    python scripts/transport_benchmark.py                         # this checkout, ~1 minute
    python scripts/transport_benchmark.py --against ../old-tree   # A/B with another checkout
    python scripts/transport_benchmark.py --ceiling               # and grpc_ceiling.py's bound
    python scripts/transport_benchmark.py --shared-memory         # and the image in shared memory
    python scripts/transport_benchmark.py --frontends 0 1 2 \
        --server-cpus 0-1 --client-cpus 0-1                       # front-end processes, N each
    python scripts/transport_benchmark.py --fixed-cost 384 --concurrency 32 \
        --server-cpus 0-1 --client-cpus 1                         # GPU-like: batches form

The model averages a 3x224x224 FP32 image (602 KB, ResNet's input), so nearly
all of a request's cost is receiving, decoding, batching and answering it: the
part of serving an image model that no GPU speeds up. The server runs on
--server-cpus and perf_analyzer on --client-cpus; rounds alternate between the
trees (make the other one with `git worktree add DIR COMMIT`) so that a shared
machine's drift falls on both alike. It prints each round and the medians.

Such a cheap model answers every request before the next arrives, so batches
hardly form. `--fixed-cost N` adds work that does not grow with the batch (two
NxN matrix products on one thread; 384 is about 2.4 ms here), as a GPU's run
does not: requests then queue and merge, and each round also prints the
server's mean batch and its time per batch merging inputs ("merge"), running
the model and encoding outputs, from ModelStatistics.

`--shared-memory` adds a run of this tree with --allow-shared-memory where
perf_analyzer passes the image and the answer through system shared memory
(`--shared-memory system`) instead of the gRPC message. `--frontends N...`
runs this tree once per N of --frontend-processes (with --shared-memory, each
also in shared memory) instead of once with the default.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import benchmark  # noqa: E402  (server runner and perf_analyzer driver)
from bench_servers import cpu_by_role  # noqa: E402

MODEL = "image_mean"
CONFIG = f"""name: "{MODEL}"
platform: "onnxruntime_onnx"
max_batch_size: 128
input [ {{ name: "image" data_type: TYPE_FP32 dims: [ 3, 224, 224 ] }} ]
output [ {{ name: "mean" data_type: TYPE_FP32 dims: [ 1 ] }} ]
dynamic_batching {{ }}
"""
# The fixed cost runs on the instance thread alone, as a GPU run occupies one thread.
ONE_THREAD = 'parameters { key: "intra_op_thread_count" value: { string_value: "1" } }\n'


def write_repository(root: Path, fixed_cost: int = 0) -> Path:
    """A repository with one model: the mean of each image, shape [batch, 1].

    With `fixed_cost` N, the mean also gets 0 x (sum of W @ W @ W) added, W being
    N x N and scaled by the batch's mean so that onnxruntime cannot fold it away.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("ReduceMean", ["image"], ["means"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Reshape", ["means", "rows_by_one"], ["mean" if not fixed_cost else "m"]),
    ]
    constants = [helper.make_tensor("rows_by_one", TensorProto.INT64, [2], [-1, 1])]
    if fixed_cost:
        weights = np.random.default_rng(0).standard_normal((fixed_cost, fixed_cost))
        nodes += [
            helper.make_node("ReduceMean", ["m"], ["scalar"], keepdims=0),
            helper.make_node("Mul", ["w", "scalar"], ["scaled"]),
            helper.make_node("MatMul", ["scaled", "w"], ["once"]),
            helper.make_node("MatMul", ["once", "w"], ["twice"]),
            helper.make_node("ReduceSum", ["twice"], ["total"], keepdims=0),
            helper.make_node("Mul", ["total", "zero"], ["nothing"]),
            helper.make_node("Add", ["m", "nothing"], ["mean"]),
        ]
        constants += [
            numpy_helper.from_array((weights / fixed_cost).astype(np.float32), "w"),
            numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        ]
    graph = helper.make_graph(
        nodes,
        MODEL,
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("mean", TensorProto.FLOAT, ["batch", 1])],
        constants,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    folder = root / MODEL
    (folder / "1").mkdir(parents=True)
    onnx.save(model, str(folder / "1" / "model.onnx"))
    (folder / "config.pbtxt").write_text(CONFIG + (ONE_THREAD if fixed_cost else ""))
    return root


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", type=Path, help="another checkout to alternate with")
    parser.add_argument("--ceiling", action="store_true", help="also grpc_ceiling.py (this tree)")
    parser.add_argument(
        "--shared-memory", action="store_true", help="also the same load in system shared memory"
    )
    parser.add_argument(
        "--frontends", type=int, nargs="+", metavar="N", help="--frontend-processes values to run"
    )
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=6.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--server-cpus", help="CPU list for the server, e.g. 0 or 0-3")
    parser.add_argument("--client-cpus", help="CPU list for perf_analyzer, e.g. 1 or 4-7")
    parser.add_argument(
        "--fixed-cost",
        type=int,
        default=0,
        metavar="N",
        help="add a per-batch cost that does not grow with the batch (N x N products)",
    )
    options = parser.parse_args()
    server_cpus, client_cpus = benchmark.split_cpus(options.server_cpus, options.client_cpus)

    shared = ["--shared-memory", "system", "--output-shared-memory-size", "64"]
    runs: dict[str, dict[str, object]] = {}
    for count in options.frontends or [None]:
        name = "this" if count is None else f"N={count}"
        flags = [] if count is None else ["--frontend-processes", str(count)]
        runs[name] = {"tree": ROOT, "server": flags}
        if options.shared_memory:
            runs[f"shm {name}" if count is not None else "shm"] = {
                "tree": ROOT,
                "server": [*flags, "--allow-shared-memory"],
                "client": shared,
            }
    if options.against is not None:
        if not (options.against / "service" / "__main__.py").exists():
            parser.error(f"{options.against} is not a checkout of this project")
        runs["against"] = {"tree": options.against.resolve()}
    if options.ceiling:
        runs["ceiling"] = {"tree": ROOT, "entry": [str(ROOT / "scripts" / "grpc_ceiling.py")]}
    results: dict[str, list[float]] = {name: [] for name in runs}

    os.sched_setaffinity(0, client_cpus)  # perf_analyzer inherits it
    with tempfile.TemporaryDirectory() as scratch:
        repository = write_repository(Path(scratch), options.fixed_cost)
        for round_number in range(1, options.rounds + 1):
            for name, run in runs.items():
                server = benchmark.Server(
                    repository,
                    metrics=False,
                    entry=run.get("entry"),  # type: ignore[arg-type]
                    extra=run.get("server"),  # type: ignore[arg-type]
                    tree=run["tree"],  # type: ignore[arg-type]
                    cpus=server_cpus,
                )
                counted = name != "ceiling"  # the ceiling server keeps no statistics
                try:
                    before = benchmark.server_side(server.url, MODEL) if counted else None
                    cpu_before = cpu_by_role(server.pid)
                    # perf_analyzer gives up when its windows disagree by over 100%,
                    # which a shared machine sometimes causes: one more try, then skip.
                    client_flags: Any = run.get("client")
                    point = benchmark.perf_analyzer(
                        server.url, MODEL, options.concurrency, options.seconds, extra=client_flags
                    ) or benchmark.perf_analyzer(
                        server.url, MODEL, options.concurrency, options.seconds, extra=client_flags
                    )
                    after = benchmark.server_side(server.url, MODEL) if counted else None
                    cpu_after = cpu_by_role(server.pid)
                finally:
                    server.stop()
                if point is None:
                    print(f"round {round_number} {name:8} no measurement", flush=True)
                    results[name].append(math.nan)
                    continue
                results[name].append(point.throughput)
                # Every request is one row; the ceiling keeps no statistics.
                rows = after["rows"] - before["rows"] if before and after else 0
                requests = rows or point.throughput * options.seconds
                cpu = "  cpu/req " + ", ".join(
                    f"{role} {(used - cpu_before.get(role, 0.0)) * 1000 / requests:.2f} ms"
                    for role, used in cpu_after.items()
                    if role != "supervisor"
                )
                print(
                    f"round {round_number} {name:8} {point.throughput:8,.0f} infer/s  "
                    f"p50 {point.p50_ms:6.1f} ms  p99 {point.p99_ms:6.1f} ms"
                    + (benchmark.per_batch(before, after) if before and after else "")
                    + cpu,
                    flush=True,
                )
    print(
        f"\n{MODEL} (602 KB per request), concurrency {options.concurrency}, server on CPUs "
        f"{sorted(server_cpus)}, client on {sorted(client_cpus)}; medians:"
    )
    medians = {
        name: statistics.median([v for v in values if not math.isnan(v)] or [math.nan])
        for name, values in results.items()
    }
    for name, value in medians.items():
        print(f"  {name:8} {value:8,.0f} infer/s   ({runs[name]['tree']})")
    baseline = "this" if "this" in medians else next(iter(medians))
    for name, value in medians.items():
        if name != baseline:
            print(f"  {name} / {baseline}: {value / medians[baseline]:.2f}x")
    if "against" in medians:
        pairs = [
            (a, b)
            for a, b in zip(results["this"], results["against"], strict=True)
            if not (math.isnan(a) or math.isnan(b))
        ]
        wins = sum(a > b for a, b in pairs)
        print(
            f"  this / against: {medians['this'] / medians['against']:.2f}x "
            f"(this tree faster in {wins} of {len(pairs)} measured rounds)"
        )
    if "ceiling" in medians:
        print(f"  this / ceiling: {medians['this'] / medians['ceiling']:.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
