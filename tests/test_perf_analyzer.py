"""Triton's own load generator, perf_analyzer, runs against the server without errors.

perf_analyzer ships inside the tritonclient 2.41 wheel. It needs Debian's
libb64-0d and a libcudart.so.12 (from the nvidia-cuda-runtime-cu12 wheel) even
on machines without a GPU; `.ci/run` and `make test` install both.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FrontendsServer, ServerThread, serve


@pytest.fixture(scope="session")
def server(either_server: ServerThread | FrontendsServer) -> ServerThread | FrontendsServer:
    """Every test here runs against one process and against two front ends."""
    return either_server


def run_perf_analyzer(url: str, *flags: str, protocol: str = "grpc") -> str:
    """perf_analyzer on add_sub (batch 2, concurrency 4, 100-request windows) over `protocol`
    (grpc or http): its output, after checking it exited 0 and reported no error."""
    import nvidia.cuda_runtime

    binary = Path(sys.executable).parent / "perf_analyzer"
    cuda_lib = Path(next(iter(nvidia.cuda_runtime.__path__))) / "lib"
    assert binary.exists(), "perf_analyzer is missing: install tritonclient[grpc]==2.41.0"
    environment = {**os.environ, "LD_LIBRARY_PATH": str(cuda_lib)}
    command = [
        str(binary),
        "-m",
        "add_sub",
        "-u",
        url,
        "-i",
        protocol,
        "-b",
        "2",
        "--concurrency-range",
        "4",
        "--measurement-mode",
        "count_windows",
        "--measurement-request-count",
        "100",
        "--max-trials",
        "5",
        "-s",
        "50",
        *flags,
    ]
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=180)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "error" not in output.lower() and "unable" not in output.lower(), output
    assert re.search(r"Throughput: [\d.]+ infer/sec", output), output
    return output


@pytest.mark.parametrize(
    "mode", [[], ["--async"], ["--streaming", "--async"]], ids=["sync", "async", "streaming"]
)
def test_perf_analyzer_completes_without_errors(server: ServerThread, mode: list[str]) -> None:
    output = run_perf_analyzer(server.url, *mode)
    # perf_analyzer read our ModelStatistics (the 'statistics' extension) for its server section.
    server_section = re.search(r"Successful request count: (\d+)", output)
    assert server_section is not None, output
    assert int(server_section.group(1)) > 0


@pytest.mark.parametrize("mode", [[], ["--async"]], ids=["sync", "async"])
def test_perf_analyzer_over_http(server: ServerThread, mode: list[str]) -> None:
    """perf_analyzer -i http: metadata, config and statistics as JSON, binary tensors."""
    output = run_perf_analyzer(server.http_url, *mode, protocol="http")
    server_section = re.search(r"Successful request count: (\d+)", output)
    assert server_section is not None, output
    assert int(server_section.group(1)) > 0


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_perf_analyzer_with_system_shared_memory(standard_repository: Path, protocol: str) -> None:
    """perf_analyzer's --shared-memory system: inputs in regions it registers, and the
    outputs of all its concurrent requests written into one output region."""
    with serve(standard_repository, allow_shared_memory=True) as server:
        run_perf_analyzer(
            server.url if protocol == "grpc" else server.http_url,
            "--shared-memory",
            "system",
            "--output-shared-memory-size",
            "1024",
            protocol=protocol,
        )
        with server.client() as client:  # perf_analyzer unregistered what it registered
            assert not client.get_system_shared_memory_status().regions
