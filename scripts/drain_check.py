"""SIGTERM under load, repeated: how each client's last call ended.

    python scripts/drain_check.py                              # 10 runs, 16 clients
    python scripts/drain_check.py --runs 12 -- --frontend-processes 2

Each run starts the server on a model that takes a few milliseconds per request,
lets 16 clients (each on its own connection) send requests back to back for a
second, sends SIGTERM, and counts the outcomes. A client stops at its first
refusal, as a client that is told the server is going away does. The drain is
right when every refusal is UNAVAILABLE (which clients retry elsewhere), none
CANCELLED, and the exit status is 0.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import onnx_models as models  # noqa: E402  (the test suite's model builders)
from tests.process import start_on_loopback  # noqa: E402


def one_run(repository: Path, clients: int, flags: list[str]) -> tuple[int, Counter[str]]:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    server = start_on_loopback(repository, *flags)
    url = f"127.0.0.1:{server.grpc_port()}"
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()

    def send() -> None:
        x = grpcclient.InferInput("x", [1, 4], "FP32")
        x.set_data_from_numpy(np.ones((1, 4), np.float32))
        steps = grpcclient.InferInput("steps", [1, 1], "INT64")
        steps.set_data_from_numpy(np.full((1, 1), 300, np.int64))
        with grpcclient.InferenceServerClient(
            url, channel_args=[("grpc.use_local_subchannel_pool", 1)]
        ) as client:
            while True:
                try:
                    client.infer("sleepy", [x, steps])
                    outcome = "OK"
                except InferenceServerException as error:
                    outcome = str(error.status()).removeprefix("StatusCode.")
                with lock:
                    outcomes[outcome] += 1
                if outcome != "OK":
                    return

    threads = [threading.Thread(target=send) for _ in range(clients)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        server.process.send_signal(signal.SIGTERM)
        code = server.wait_exit(60)
        for thread in threads:
            thread.join(30)
    finally:
        server.kill()
    return code, outcomes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("flags", nargs="*", help="server flags, after --")
    options = parser.parse_args()
    cancelled = 0
    with tempfile.TemporaryDirectory() as scratch:
        repository = Path(scratch)
        models.save(models.sleepy_double(), repository, "sleepy", config="max_batch_size: 8\n")
        for run in range(1, options.runs + 1):
            code, outcomes = one_run(repository, options.clients, options.flags)
            cancelled += outcomes["CANCELLED"]
            print(f"run {run}: exit {code}, {dict(outcomes)}", flush=True)
    print(f"CANCELLED over {options.runs} runs: {cancelled}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
