"""GPU check: on a machine with an NVIDIA GPU, verify the server on CUDA end to end.

    python scripts/gpu_check.py                       # onnxruntime-gpu already installed
    python scripts/gpu_check.py --wheels ./wheels     # install it from local wheel files

Steps, each reported as it runs:
  1. the card and driver (nvidia-smi);
  2. onnxruntime with the CUDA provider: if it is missing, install onnxruntime-gpu
     (and any other wheel in --wheels, e.g. this project's dependencies) from the
     local wheel files with pip --no-index, after removing the CPU-only onnxruntime
     that would shadow it;
  3. the GPU-marked tests (tests/test_gpu.py): every embedded model's outputs on
     CUDA match the CPU within 1e-3 relative, the provider is reported as CUDA,
     warm-up covers every shape the batcher forms, NVML gauges are exported;
  4. scripts/gpu_benchmark.py: ResNet-18 and MiniLM on the server against raw
     onnxruntime-CUDA in-process (throughput, p99, ratios) and the first-request
     penalty with warm-up off and on;
  5. with --frontends N...: the benchmark again at c1 and the highest concurrency
     for each --frontend-processes N, over the wire and (--shared-memory) with
     perf_analyzer's --shared-memory system, into <output>/frontends-N[-shm].
Exit status: 0 when the tests pass and the benchmark ran, 1 otherwise, 2 without a GPU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def gpu_description() -> str | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    result = subprocess.run(
        [smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.strip() if result.returncode == 0 and result.stdout.strip() else None


def providers(environment: dict[str, str]) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", "import onnxruntime as o; print(*o.get_available_providers())"],
        capture_output=True,
        text=True,
        check=False,
        env=environment,
    )
    return result.stdout.split() if result.returncode == 0 else []


def install_from_wheels(wheels: Path) -> None:
    gpu_wheels = sorted(wheels.glob("onnxruntime_gpu-*.whl"))
    if not gpu_wheels:
        raise SystemExit(f"no onnxruntime_gpu-*.whl in {wheels}; download it where pip can reach")
    pip = [sys.executable, "-m", "pip"]
    # onnxruntime and onnxruntime-gpu install the same module: the CPU one must go.
    subprocess.run([*pip, "uninstall", "--yes", "--quiet", "onnxruntime"], check=False)
    command = [*pip, "install", "--quiet", "--no-index", "--find-links", str(wheels)]
    files = [str(path) for path in sorted(wheels.glob("*.whl"))]
    if subprocess.run([*command, *files], check=False).returncode != 0:
        # Offline, one unsatisfiable pin elsewhere fails the whole resolution: install the
        # given files as they are and let the provider check below judge the result.
        print("pip could not resolve every dependency offline; installing with --no-deps")
        subprocess.run([*command, "--no-deps", *files], check=True)


def library_path(extra: list[Path]) -> str:
    """CUDA and cuDNN from pip's nvidia-* packages, then --lib-dir, then what was set."""
    site = Path(sysconfig.get_paths()["purelib"])
    folders = sorted(str(p) for p in site.glob("nvidia/**/lib") if any(p.glob("*.so*")))
    folders += [str(p.resolve()) for p in extra]
    folders += [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
    return ":".join(dict.fromkeys(folders))


def run_benchmark(
    environment: dict[str, str], seconds: float, output: Path, *arguments: str
) -> subprocess.CompletedProcess[bytes]:
    """scripts/gpu_benchmark.py with this check's libraries, its output shown as it runs."""
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "gpu_benchmark.py"),
            "--seconds",
            str(seconds),
            "--output",
            str(output),
            *arguments,
        ],
        cwd=ROOT,
        env=environment,
        check=False,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", type=Path, help="folder of wheel files (onnxruntime-gpu, …)")
    parser.add_argument(
        "--lib-dir",
        type=Path,
        action="append",
        default=[],
        help="extra shared-library folder (e.g. libb64 and libcudart.so.12 for perf_analyzer)",
    )
    parser.add_argument("--seconds", type=float, default=4.0, help="benchmark: per measurement")
    parser.add_argument("--concurrency", nargs="+", default=["1", "16", "64"])
    parser.add_argument("--output", type=Path, default=ROOT / "bench-results")
    parser.add_argument("--skip-benchmark", action="store_true")
    parser.add_argument(
        "--also-with",
        default="",
        metavar="FLAGS",
        help="then measure the highest concurrency again with these server flags "
        "(e.g. '--no-cuda-io-binding'), into <output>/with-flags",
    )
    parser.add_argument(
        "--frontends",
        nargs="+",
        default=[],
        metavar="N",
        help="then measure c1 and the highest concurrency with --frontend-processes N",
    )
    parser.add_argument(
        "--shared-memory",
        action="store_true",
        help="with --frontends: each N also with inputs and outputs in system shared memory",
    )
    options = parser.parse_args()

    step("GPU")
    card = gpu_description()
    if card is None:
        print("no NVIDIA GPU: nvidia-smi is missing or lists no device")
        return 2
    print(card)

    step("onnxruntime with CUDA")
    environment = {**os.environ, "LD_LIBRARY_PATH": library_path(options.lib_dir)}
    found = providers(environment)
    if "CUDAExecutionProvider" not in found:
        if options.wheels is None:
            print(f"onnxruntime offers {found or 'nothing'}; give --wheels with onnxruntime-gpu")
            return 1
        print(f"onnxruntime offers {found or 'nothing'}: installing from {options.wheels}")
        install_from_wheels(options.wheels)
        environment["LD_LIBRARY_PATH"] = library_path(options.lib_dir)
        found = providers(environment)
    print("providers:", " ".join(found))
    if "CUDAExecutionProvider" not in found:
        return 1

    step("GPU tests (pytest -m gpu tests/test_gpu.py)")
    tests = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-m",
            "gpu",
            "tests/test_gpu.py",
            "-v",
            "-p",
            "no:cacheprovider",
            # Another machine's package versions warn about each other: report, don't fail.
            "-W",
            "default",
        ],
        cwd=ROOT,
        env=environment,
        check=False,
    )
    if options.skip_benchmark:
        return 0 if tests.returncode == 0 else 1

    step("benchmark (scripts/gpu_benchmark.py)")
    benchmark = run_benchmark(
        environment, options.seconds, options.output, "--concurrency", *options.concurrency
    )
    variant_ok = True
    if options.also_with:
        step(f"benchmark with server flags {options.also_with}")
        variant = run_benchmark(
            environment,
            options.seconds,
            options.output / "with-flags",
            "--concurrency",
            max(options.concurrency, key=int),
            "--server-args",
            options.also_with,
            "--skip-first-request",
        )
        variant_ok = variant.returncode == 0
    highest = max(options.concurrency, key=int)
    for count in options.frontends:
        for shared in (False, True) if options.shared_memory else (False,):
            label = f"frontends-{count}" + ("-shm" if shared else "")
            step(f"benchmark, {label}")
            server_flags = f"--frontend-processes {count}" + (
                " --allow-shared-memory" if shared else ""
            )
            client_flags = (
                ["--client-args", "--shared-memory system --output-shared-memory-size 1048576"]
                if shared
                else []
            )
            variant = run_benchmark(
                environment,
                options.seconds,
                options.output / label,
                "--concurrency",
                "1",
                highest,
                "--repeats",
                "1",
                "--server-args",
                server_flags,
                *client_flags,
                "--skip-first-request",
            )
            variant_ok = variant_ok and variant.returncode == 0
    step("summary")
    print(
        f"{card}; GPU tests {'passed' if tests.returncode == 0 else 'FAILED'}; benchmark "
        f"{'ran' if benchmark.returncode == 0 else 'FAILED'}"
        + ("" if variant_ok else "; a variant FAILED")
    )
    return 0 if tests.returncode == 0 and benchmark.returncode == 0 and variant_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
