"""Server settings: one typed, validated object built once at start-up.

Each field carries its default, its bounds and a one-line help text in its
metadata; the CLI builds its flags from these fields and reads the
`BATCHWISE_<FIELD>` environment variables, so a setting is declared exactly
once. Nothing reads the environment at import time.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "BATCHWISE_"
INT32_MAX = 2**31 - 1
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")
CONTROL_MODES = ("none", "explicit", "poll")
WARMUP_MODES = ("off", "gpu", "all")
CONV_ALGO_SEARCHES = ("HEURISTIC", "EXHAUSTIVE", "DEFAULT")
ARENA_STRATEGIES = ("kSameAsRequested", "kNextPowerOfTwo")
EVENT_LOOPS = ("auto", "uvloop", "asyncio")
SPINNING_MODES = ("auto", "on", "off")
# --frontend-processes -1: front ends only where there are cores to spare for them.
FRONTENDS_MIN_CORES = 8
AUTO_FRONTENDS = 2


def _setting(
    default: Any,
    help: str,
    *,
    low: float | None = None,
    high: float | None = None,
    choices: tuple[str, ...] | None = None,
    secret: bool = False,
) -> Any:
    # Secrets stay out of repr(), so a logged Settings never shows them.
    return field(
        default=default,
        repr=not secret,
        metadata={"help": help, "low": low, "high": high, "choices": choices, "secret": secret},
    )


def project_root() -> Path:
    return Path(__file__).resolve().parent.parent


def embedded_repository() -> Path:
    """The repository this checkout ships (models/repository), served by default."""
    return project_root() / "models" / "repository"


@dataclass(frozen=True)
class Settings:
    model_repository: Path = _setting(
        None,
        "model repository folder (<model>/config.pbtxt, <model>/<version>/model.onnx); "
        "default: the embedded models/repository",
    )
    grpc_host: str = _setting("0.0.0.0", "address the gRPC server binds")
    grpc_port: int = _setting(
        8001, "gRPC port; 0 picks a free port (the log says which)", low=0, high=65535
    )
    http_host: str = _setting("0.0.0.0", "address the HTTP/REST server (KServe v2) binds")
    http_port: int = _setting(
        8000,
        "HTTP/REST port (KServe v2 / Triton HTTP protocol); 0 turns HTTP off, -1 picks a free "
        "port (the log says which)",
        low=-1,
        high=65535,
    )
    http_max_connections: int = _setting(
        1000,
        "HTTP connections and requests the server holds at once; beyond it new requests are "
        "answered 503 at once",
        low=1,
        high=INT32_MAX,
    )
    metrics_host: str = _setting("0.0.0.0", "address the Prometheus /metrics endpoint binds")
    metrics_port: int = _setting(
        8002, "Prometheus /metrics port; 0 picks a free port, -1 disables", low=-1, high=65535
    )
    triton_metrics: bool = _setting(
        True,
        "also export Triton's metric names (nv_inference_*, nv_gpu_*) for Triton dashboards "
        "and perf_analyzer --collect-metrics",
    )
    log_level: str = _setting("INFO", "log level", choices=LOG_LEVELS)
    log_format: str = _setting("text", "log line format", choices=LOG_FORMATS)
    access_log: bool = _setting(
        False, "log one line per inference request (model, version, status, rows, duration)"
    )
    max_message_bytes: int = _setting(
        INT32_MAX,
        "largest gRPC message accepted or sent, in bytes (tritonclient uses INT32_MAX)",
        low=1024,
        high=INT32_MAX,
    )
    default_max_batch_size: int = _setting(
        4,
        "max_batch_size given to a batchable model whose config does not set one",
        low=1,
        high=INT32_MAX,
    )
    auto_complete_config: bool = _setting(
        True, "complete missing config fields (inputs, outputs, batching) from the ONNX graph"
    )
    strict_readiness: bool = _setting(
        False, "report the server ready only when every model in the repository is ready"
    )
    shutdown_grace_seconds: float = _setting(
        30.0,
        "on SIGTERM/SIGINT, how long in-flight requests may take to finish",
        low=0.0,
        high=3600.0,
    )
    default_max_queue_size: int = _setting(
        1024,
        "requests that may wait per model version and priority level when the config's "
        "queue policy sets no max_queue_size; 0 = unbounded (Triton's default)",
        low=0,
        high=INT32_MAX,
    )
    onnxruntime_intra_op_threads: int = _setting(
        0,
        "onnxruntime threads per CPU session; 0 = chosen at load: the session's share of the "
        "cores, or 1 for a model that runs a single row in under a millisecond; a model's "
        "intra_op_thread_count parameter overrides",
        low=0,
        high=1024,
    )
    narrow_sessions: bool = _setting(
        True,
        "CPU models that get several threads and set no instance count: one instance per "
        "thread, each running on one thread while more than one batch runs (a second, "
        "one-thread session: the weights twice in memory)",
    )
    onnxruntime_spinning: str = _setting(
        "auto",
        "whether onnxruntime's threads busy-wait between operators: auto (during runs, for "
        "CPU sessions with more than one thread), on, off; a model's allow_spinning "
        "parameter overrides",
        choices=SPINNING_MODES,
    )
    inline_lone_requests: bool = _setting(
        True,
        "run a request that finds the server idle on the event loop itself when its model "
        "(CPU, no control flow) runs it in under a millisecond, instead of handing it to an "
        "instance thread and back",
    )
    linger_microseconds: int = _setting(
        1000,
        "after answering a request that found the server idle, the event loop polls this "
        "long instead of sleeping, so that the client's next request finds it awake; 0 = off",
        low=0,
        high=1_000_000,
    )
    event_loop: str = _setting(
        "auto",
        "the event loop under gRPC: uvloop (cheaper per call), asyncio (the standard "
        "library's), or auto (uvloop where it is installed)",
        choices=EVENT_LOOPS,
    )
    gil_switch_interval_ms: float = _setting(
        5.0,
        "how long a Python thread may keep the GIL while another waits for it (Python's "
        "default 5 ms); instance threads wait up to this for the event loop after each "
        "onnxruntime run",
        low=0.05,
        high=100.0,
    )
    model_load_parallelism: int = _setting(
        2, "how many model versions load at the same time at start-up", low=1, high=64
    )
    model_control_mode: str = _setting(
        "none",
        "none: load the repository at start-up, no changes after; explicit: load and unload "
        "through RepositoryModelLoad/Unload (and --load-model at start-up); poll: follow the "
        "repository on disk every --repository-poll-seconds",
        choices=CONTROL_MODES,
    )
    load_model: str = _setting(
        "",
        "explicit mode: comma-separated models to load at start-up ('*' = all); others wait "
        "for RepositoryModelLoad",
    )
    repository_poll_seconds: float = _setting(
        15.0, "poll mode: seconds between two looks at the repository", low=0.1, high=86400.0
    )
    max_request_elements: int = _setting(
        2**26,
        "most tensor elements one inference request may hold, all inputs together "
        "(RESOURCE_EXHAUSTED above it); 0 = no limit",
        low=0,
        high=2**62,
    )
    max_requests_in_flight: int = _setting(
        4096,
        "inference requests the server holds at once, all models together; more are refused "
        "at once with UNAVAILABLE before their tensors are decoded; 0 = no limit",
        low=0,
        high=INT32_MAX,
    )
    frontend_processes: int = _setting(
        -1,
        "gRPC front-end processes in front of one engine process (SO_REUSEPORT on one port); "
        "0 = front end and engine in one process; -1 = chosen: 0 below "
        f"{FRONTENDS_MIN_CORES} cores or when /dev/shm cannot hold their slabs, else "
        f"{AUTO_FRONTENDS}",
        low=-1,
        high=64,
    )
    frontend_slab_bytes: int = _setting(
        64 * 1024 * 1024,
        "shared memory each front end and the engine set aside for the tensors in flight "
        "between them, each way (a request that does not fit is refused with "
        "RESOURCE_EXHAUSTED)",
        low=1024 * 1024,
        high=2**40,
    )
    allow_shared_memory: bool = _setting(
        False,
        "let clients register system shared memory regions (Triton's shared-memory "
        "extension) and pass tensors through them instead of the gRPC message",
    )
    grpc_max_pending_calls: int = _setting(
        1000,
        "calls gRPC may hold before the server has taken them; beyond it gRPC itself turns "
        "new calls away at once, with CANCELLED",
        low=1,
        high=INT32_MAX,
    )
    gpu_fallback_to_cpu: bool = _setting(
        False,
        "load a model that asks for KIND_GPU on the CPU, with a warning, when CUDA is "
        "unavailable (default: its load fails and says why)",
    )
    cuda_conv_algo_search: str = _setting(
        "HEURISTIC",
        "cuDNN convolution algorithm search: HEURISTIC (cheap per new shape), EXHAUSTIVE "
        "(benchmarks every new input shape: slow first requests), DEFAULT",
        choices=CONV_ALGO_SEARCHES,
    )
    cuda_memory_limit_bytes: int = _setting(
        0,
        "bound of each GPU session's memory arena in bytes; 0 = no bound",
        low=0,
        high=2**62,
    )
    cuda_arena_extend_strategy: str = _setting(
        "kSameAsRequested",
        "how the GPU memory arena grows: kSameAsRequested (only what is needed) or "
        "kNextPowerOfTwo (onnxruntime's default; fewer, larger steps)",
        choices=ARENA_STRATEGIES,
    )
    cuda_io_binding: bool = _setting(
        True,
        "run GPU sessions through IOBinding: each input copied to the device once, "
        "each output back once",
    )
    staging_buffer_limit_bytes: int = _setting(
        256 * 2**20,
        "largest merged batch input (bytes) kept in a reusable per-instance-thread buffer; "
        "larger ones are allocated per batch; 0 = allocate every batch",
        low=0,
        high=2**40,
    )
    cuda_pinned_staging: bool = _setting(
        True,
        "GPU sessions' staging buffers are page-locked (pinned), so a batch is copied to the "
        "GPU by DMA",
    )
    warmup: str = _setting(
        "gpu",
        "run the batch sizes (and sequence lengths) the batcher will form at load: off, "
        "gpu (models on a GPU), all; a model's 'warmup' parameter overrides",
        choices=WARMUP_MODES,
    )
    grpc_tls_cert: Path = _setting(
        None, "PEM certificate (chain) the gRPC server presents; with --grpc-tls-key turns TLS on"
    )
    grpc_tls_key: Path = _setting(None, "PEM private key of --grpc-tls-cert")
    grpc_tls_client_ca: Path = _setting(
        None,
        "PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS)",
    )
    auth_token: str = _setting(
        None,
        "bearer token every inference-service call must carry (metadata 'authorization: "
        "Bearer <token>'); health checks stay open. Prefer the environment variable",
        secret=True,
    )
    admin_token: str = _setting(
        None,
        "bearer token for RepositoryModelLoad/Unload (default: the --auth-token)",
        secret=True,
    )

    def __post_init__(self) -> None:
        if self.model_repository is None:
            object.__setattr__(self, "model_repository", embedded_repository())
        object.__setattr__(self, "model_repository", Path(self.model_repository))
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            low, high, choices = (
                spec.metadata["low"],
                spec.metadata["high"],
                spec.metadata["choices"],
            )
            if (low is not None and value < low) or (high is not None and value > high):
                raise ValueError(
                    f"{spec.name} = {value} is out of range; expected {low} ≤ {spec.name} ≤ {high}"
                )
            if choices is not None and value not in choices:
                raise ValueError(f"{spec.name} = {value!r}; expected one of {', '.join(choices)}")
        for name in ("grpc_tls_cert", "grpc_tls_key", "grpc_tls_client_ca"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        if (self.grpc_tls_cert is None) != (self.grpc_tls_key is None):
            raise ValueError("grpc_tls_cert and grpc_tls_key go together; give both or neither")
        if self.grpc_tls_client_ca is not None and self.grpc_tls_cert is None:
            raise ValueError(
                "grpc_tls_client_ca (mutual TLS) needs TLS on: give grpc_tls_cert and grpc_tls_key"
            )
        for name in ("auth_token", "admin_token"):
            token = getattr(self, name)
            if token is not None and (
                len(token) < 16 or not (token.isascii() and token.isprintable()) or " " in token
            ):
                raise ValueError(
                    f"{name} must be at least 16 printable ASCII characters without spaces"
                )
        fixed = {"grpc_port": self.grpc_port}
        for name, port in (("http_port", self.http_port), ("metrics_port", self.metrics_port)):
            if port > 0:
                clash = next((other for other, value in fixed.items() if value == port), None)
                if clash is not None:
                    raise ValueError(
                        f"{clash} and {name} are both {port}; give them different ports"
                    )
                fixed[name] = port

    @property
    def log_level_number(self) -> int:
        return int(logging.getLevelName(self.log_level))


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def parse_value(spec: dataclasses.Field[Any], text: str) -> Any:
    """Convert an environment string to a field's type, with a message naming the variable."""
    kind = spec.type if isinstance(spec.type, str) else getattr(spec.type, "__name__", "")
    try:
        if kind == "bool":
            lowered = text.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        if kind == "Path":
            return Path(text)
        return text
    except ValueError:
        raise ValueError(f"{env_name(spec.name)}={text!r} is not a valid {kind}") from None


def from_environment(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The settings given through BATCHWISE_* variables, parsed."""
    environ = dict(os.environ) if environ is None else environ
    values: dict[str, Any] = {}
    for spec in dataclasses.fields(Settings):
        text = environ.get(env_name(spec.name))
        if text is not None and text != "":
            values[spec.name] = parse_value(spec, text)
    return values
