"""The model repository on disk and the registry of what has been loaded from it.

A model that fails to load, or one of its versions that fails, is recorded with
its reason and reported not ready; it never stops the other models. Requests
resolve a (name, version) pair here to a ready `ModelVersion`.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .batching import BatchingPolicy, Scheduler
from .datatypes import format_shape
from .errors import (
    InvalidInputError,
    ModelLoadError,
    ModelLoadFailedError,
    ModelNotFoundError,
    ModelNotReadyError,
    ServingError,
    Status,
)
from .execution import ModelRunner
from .gpu import tensorrt_libraries_present, visible_gpu_count
from .inference import InferenceRequest, InferenceResult
from .model_config import (
    ConfigFile,
    ModelConfigError,
    ModelSignature,
    TensorSpec,
    complete_config,
    normalize_config,
    read_config,
    validate_config,
)
from .placement import CUDA, GpuDefaults, leaves_kind_to_server, plan_placement
from .protocol import model_config_pb2 as mc
from .runtime import OnnxSession, available_providers
from .sessions import open_sessions
from .settings import Settings
from .statistics import ModelStats
from .text import TextEncoder, TextInputConfig, with_text_input
from .warmup import WarmupReport, sequence_lengths, warm_up
from .warmup import wanted as warmup_wanted

log = logging.getLogger(__name__)

CONFIG_FILE = "config.pbtxt"
DEFAULT_MODEL_FILE = "model.onnx"


# Per model folder: (relative path, size, mtime_ns) of every file in it.
Fingerprints = dict[str, tuple[tuple[str, int, int], ...]]


class VersionState(enum.Enum):
    LOADING = "LOADING"
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"


class ModelVersion:
    """A loaded, servable version of a model."""

    def __init__(
        self,
        name: str,
        version: int,
        config: mc.ModelConfig,
        signature: ModelSignature,
        sessions: Sequence[OnnxSession],
        policy: BatchingPolicy,
        instance_count: int,
        text_encoder: TextEncoder | None = None,
        histograms: bool = True,
        staging_limit_bytes: int = 0,
        pinned_staging: bool = False,
        inline_runs: bool = False,
        narrow_session: OnnxSession | None = None,
    ) -> None:
        self.name = name
        self.text_encoder = text_encoder
        self.version = version
        self.config = config
        self.signature = signature
        self.sessions = tuple(sessions)
        # What runs it, as the log, ModelConfig parameters and metrics report it.
        self.provider = self.sessions[0].provider
        self.devices = tuple(session.device for session in self.sessions)
        self.warmup: WarmupReport | None = None
        self.label = f"model '{name}' version {version}"
        # Requests that resolved to this version and are not finished with it yet;
        # a version replaced or unloaded is closed only once this is back to 0.
        self.active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.stats = ModelStats(histograms=histograms)
        self.load_seconds = 0.0
        self.latency_objective_seconds = latency_objective(config)
        self.runner = ModelRunner(
            self.sessions,
            signature,
            self.label,
            staging_limit_bytes,
            pinned_staging,
            narrow_session,
        )
        self.scheduler = Scheduler(
            self.runner,
            signature,
            policy,
            instance_count,
            self.stats,
            self.label,
            inline_runs,
        )

    async def infer(self, request: InferenceRequest, alone: bool = False) -> InferenceResult:
        """Queue, batch and execute a validated request; account for its outcome.

        `alone`: no other request is in flight in the server (see Scheduler.infer).
        """
        self.stats.request_started()
        try:
            result, timings = await self.scheduler.infer(request, alone)
        except ServingError as error:
            self._failed(request.received_ns, error.status, started=True)
            raise
        except asyncio.CancelledError:
            self._failed(request.received_ns, Status.CANCELLED, started=True)
            raise
        except Exception:
            self._failed(request.received_ns, Status.INTERNAL, started=True)
            raise
        self.stats.record_success(
            request.batch_size, time.perf_counter_ns() - request.received_ns, timings
        )
        return result

    def enter(self) -> None:
        self.active += 1
        self._idle.clear()

    def leave(self) -> None:
        self.active -= 1
        if self.active == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def record_failure(self, received_ns: int, status: Status) -> None:
        """Count a request that reached this version but failed validation."""
        self._failed(received_ns, status, started=False)

    def _failed(self, received_ns: int, status: Status, started: bool) -> None:
        self.stats.record_failure(time.perf_counter_ns() - received_ns, status.value, started)

    def close(self) -> None:
        self.scheduler.close()

    def join(self, timeout: float) -> None:
        self.scheduler.join(timeout)


@dataclass
class VersionRecord:
    version: int
    state: VersionState = VersionState.LOADING
    reason: str = ""
    loaded: ModelVersion | None = None


@dataclass
class ModelRecord:
    """What the repository holds under one model name, loaded or not."""

    name: str
    reason: str = ""  # set when the model as a whole could not be loaded
    versions: dict[int, VersionRecord] = field(default_factory=dict)
    # Unloaded on request (or removed from a polled repository): listed, never served.
    unloaded: bool = False

    def ready_versions(self) -> list[ModelVersion]:
        return [
            record.loaded
            for _, record in sorted(self.versions.items())
            if record.state is VersionState.READY and record.loaded is not None
        ]


@dataclass(frozen=True)
class IndexEntry:
    name: str
    version: str
    state: str
    reason: str


def scan_versions(model_dir: Path) -> list[int]:
    """Numeric version folders; Triton skips names with a leading zero, and so do we."""
    versions = []
    for child in model_dir.iterdir():
        if child.is_dir() and is_version_text(child.name) and not child.name.startswith("0"):
            versions.append(int(child.name))
    return sorted(versions)


def select_versions(
    policy: mc.ModelVersionPolicy, present: list[int]
) -> tuple[list[int], list[int]]:
    """The versions to serve, and those the policy names that are not on disk."""
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return present, []
    if choice == "specific":
        wanted = sorted(set(policy.specific.versions))
        return [v for v in wanted if v in present], [v for v in wanted if v not in present]
    count = policy.latest.num_versions if choice == "latest" else 1
    return present[-max(count, 1) :], []


def describe_signature(signature: ModelSignature) -> str:
    def render(specs: tuple[TensorSpec, ...]) -> str:
        return ", ".join(
            f"{s.name} {s.datatype.name} {format_shape(s.client_shape(signature.batching))}"
            for s in specs
        )

    return f"inputs: {render(signature.inputs)}; outputs: {render(signature.outputs)}"


class ModelRegistry:
    """Loads every model in a repository and resolves requests to loaded versions."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.max_request_elements = settings.max_request_elements
        self.root = Path(settings.model_repository)
        self.records: dict[str, ModelRecord] = {}
        self.loading_done = False
        self._locks: dict[str, asyncio.Lock] = {}
        # Called with a model name whenever what it serves changes (health follows it).
        self.on_change: Callable[[str], None] | None = None
        self._loader = ThreadPoolExecutor(
            max_workers=settings.model_load_parallelism, thread_name_prefix="model-load"
        )

    # ------------------------------------------------------------ loading ---

    async def load_all(self, only: Sequence[str] | None = None) -> None:
        """Load the repository's models at start-up (`only`: just these names)."""
        if not self.root.is_dir():
            raise ModelLoadError(f"model repository {self.root} is not a folder")
        names = sorted(
            child.name
            for child in self.root.iterdir()
            if child.is_dir() and not child.name.startswith(".")
        )
        if only is not None:
            missing = sorted(set(only) - set(names))
            for name in missing:
                log.error("model '%s' (--load-model) is not in the repository", name)
            names = [name for name in names if name in only]
        if not names:
            log.warning("model repository %s holds no models", self.root)
        jobs: list[tuple[ModelRecord, ConfigFile, VersionRecord]] = []
        for name in names:
            record = ModelRecord(name)
            self.records[name] = record
            try:
                config_file, versions = self._plan_model(name)
            except ModelLoadError as error:
                record.reason = self._scrub(str(error))
                log.error("model '%s' is not available: %s", name, error)
                continue
            except Exception:  # unreadable folder, a bug: this model only
                record.reason = "unexpected error while reading the model folder (see server log)"
                log.exception("model '%s' is not available", name)
                continue
            for version in versions:
                version_record = VersionRecord(version)
                record.versions[version] = version_record
                jobs.append((record, config_file, version_record))
        loop = asyncio.get_running_loop()
        loader = ThreadPoolExecutor(
            max_workers=self._settings.model_load_parallelism, thread_name_prefix="model-load"
        )
        try:
            await asyncio.gather(
                *(
                    loop.run_in_executor(loader, self._load_version, record, config_file, version)
                    for record, config_file, version in jobs
                )
            )
        finally:
            # Never block the event loop here: a shutdown during loading must stay prompt.
            loader.shutdown(wait=False, cancel_futures=True)
        self.loading_done = True

    def _scrub(self, text: str) -> str:
        """Reasons reach clients (RepositoryIndex): name paths relative to the repository."""
        for prefix in {str(self.root.resolve()), str(self.root), str(self.root.absolute())}:
            text = text.replace(prefix + "/", "")
        return text

    def _plan_model(
        self, name: str, override: ConfigFile | None = None
    ) -> tuple[ConfigFile, list[int]]:
        model_dir = self.root / name
        config_path = model_dir / CONFIG_FILE
        if override is not None:
            config_file = override
        elif config_path.is_file():
            config_file = read_config(config_path)
        elif self._settings.auto_complete_config:
            config_file = ConfigFile(mc.ModelConfig(), max_batch_size_given=False)
        else:
            raise ModelConfigError(f"{CONFIG_FILE} is missing and auto-complete is off")
        present = scan_versions(model_dir)
        if not present:
            raise ModelLoadError(
                "no version folders: expected numeric folders such as "
                f"{name}/1/{DEFAULT_MODEL_FILE}"
            )
        selected, absent = select_versions(config_file.config.version_policy, present)
        for version in absent:
            log.warning(
                "model '%s': version_policy names version %d, which is not on disk", name, version
            )
        if not selected:
            raise ModelLoadError(f"version_policy selects none of the versions on disk ({present})")
        return config_file, selected

    def _load_version(
        self, record: ModelRecord, config_file: ConfigFile, target: VersionRecord
    ) -> None:
        started = time.perf_counter()
        try:
            target.loaded = self._build_version(record.name, target.version, config_file)
        except ModelLoadError as error:
            # Clients see the reason in RepositoryIndex: paths relative to the repository.
            reason = str(error).replace(f"{self.root}/", "")
            target.state, target.reason = VersionState.UNAVAILABLE, reason
            log.error(
                "model '%s' version %d failed to load: %s", record.name, target.version, error
            )
            return
        except Exception as error:  # a bug or an unexpected onnxruntime failure
            target.state, target.reason = VersionState.UNAVAILABLE, f"unexpected error: {error}"
            log.exception("model '%s' version %d failed to load", record.name, target.version)
            return
        target.state = VersionState.READY
        loaded = target.loaded
        loaded.load_seconds = time.perf_counter() - started
        warmed = (
            f"; warm-up {len(set(loaded.warmup.shapes))} shapes, {loaded.warmup.runs} runs "
            f"over the instance threads, in {loaded.warmup.seconds:.2f}s"
            if loaded.warmup is not None
            else ""
        )
        log.info(
            "loaded model '%s' version %d in %.2fs on %s (%s), max_batch_size %d%s; %s",
            loaded.name,
            loaded.version,
            loaded.load_seconds,
            ", ".join(loaded.devices),
            loaded.provider,
            loaded.signature.max_batch_size,
            warmed,
            describe_signature(loaded.signature),
        )

    def _build_version(self, name: str, version: int, config_file: ConfigFile) -> ModelVersion:
        model_dir = self.root / name
        raw = config_file.config
        filename = raw.default_model_filename or DEFAULT_MODEL_FILE
        model_path = model_dir / str(version) / filename
        if model_path.is_dir():  # Triton allows a folder holding the model and external data
            model_path = model_path / DEFAULT_MODEL_FILE
        if not model_path.is_file():
            raise ModelLoadError(f"{version}/{filename} was not found")
        if not self._inside_repository(model_path):
            raise ModelLoadError(
                f"{version}/{filename} resolves outside the model repository (a symlink or "
                "'..' in default_model_filename); models must live inside it"
            )
        providers = available_providers()
        gpu_count = visible_gpu_count()
        gpu_available = CUDA in providers and gpu_count != 0
        normalized = normalize_config(config_file, name, gpu_available)
        gpu_defaults = GpuDefaults.from_settings(self._settings)
        placement = plan_placement(
            normalized,
            providers,
            gpu_count,
            gpu_defaults,
            tensorrt_libraries_present(),
            model_dir,
            kind_auto=leaves_kind_to_server(raw),
        )
        opened = open_sessions(
            model_path,
            model_dir,
            normalized,
            placement,
            self._settings,
            f"model '{name}' version {version}",
            count_given=any(group.count for group in raw.instance_group),
        )
        sessions = opened.sessions
        session = sessions[0]
        for note in (*placement.notes, *(n for s in sessions for n in s.notes)):
            log.warning("model '%s' version %d: %s", name, version, note)
        if self._settings.auto_complete_config:
            config = complete_config(
                config_file,
                session.graph,
                name,
                self._settings.default_max_batch_size,
                gpu_available,
            )
        else:
            config = normalized
        signature = validate_config(config, session.graph, name)
        encoder = None
        text = TextInputConfig.from_config(config, session.graph, [model_path.parent, model_dir])
        if text is not None:
            encoder = TextEncoder(text)
            config, signature = with_text_input(config, signature, text, encoder.pad_id)
        _report_placement(config, sessions)
        policy = BatchingPolicy.from_config(config, self._settings.default_max_queue_size)
        loaded = ModelVersion(
            name,
            version,
            config,
            signature,
            sessions,
            policy,
            opened.instances_per_device * len(sessions),
            encoder,
            histograms=self._settings.metrics_port >= 0,
            staging_limit_bytes=self._settings.staging_buffer_limit_bytes,
            pinned_staging=self._settings.cuda_pinned_staging,
            inline_runs=opened.inline_runs,
            narrow_session=opened.narrow,
        )
        if warmup_wanted(self._settings.warmup, config, session.on_gpu):
            loaded.warmup = _warm_up_instances(loaded)
        return loaded

    # ------------------------------------------------------ model control ---

    def _inside_repository(self, path: Path) -> bool:
        return path.resolve().is_relative_to(self.root.resolve())

    def model_folder(self, name: str) -> Path:
        """The folder of model `name`, refusing names that would leave the repository.

        Names come from clients (RepositoryModelLoad): one plain path component,
        no separators, no '.'/'..', no hidden names, and the folder, symlinks
        resolved, must be inside the repository.
        """
        check_model_name(name)
        folder = self.root / name
        if not folder.is_dir():
            raise ModelNotFoundError(f"the model repository has no folder '{name}'")
        if not self._inside_repository(folder):
            raise InvalidInputError(
                f"model folder '{name}' is a symlink that leads outside the model repository"
            )
        return folder

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def load_model(self, name: str, override: ConfigFile | None = None) -> None:
        """Load `name` (see _load_model); the work finishes even if the caller goes away.

        A cancelled RPC must not strand half-built sessions or versions waiting to
        close: the registry owns the task, the caller only waits for it.
        """
        self.model_folder(name)
        await asyncio.shield(asyncio.ensure_future(self._load_model(name, override)))

    async def unload_model(self, name: str) -> None:
        """Stop serving `name`; returns once its in-flight requests have finished."""
        check_model_name(name)
        await asyncio.shield(asyncio.ensure_future(self._unload_model(name)))

    async def _load_model(self, name: str, override: ConfigFile | None = None) -> None:
        """(Re)load every selected version of `name`; swap them in only if all load.

        Requests keep going to the versions being replaced until the swap (one
        assignment on the event loop); those versions close once the requests
        that resolved to them have finished. A failed load changes nothing and
        raises ModelLoadFailedError with each reason.
        """
        async with self._lock(name):
            record = ModelRecord(name)
            try:
                config_file, versions = await asyncio.to_thread(self._plan_model, name, override)
            except ModelLoadError as error:
                reason = self._failed_load(name, self._scrub(str(error)))
                raise ModelLoadFailedError(reason) from None
            record.versions = {version: VersionRecord(version) for version in versions}
            loop = asyncio.get_running_loop()
            await asyncio.gather(
                *(
                    loop.run_in_executor(
                        self._loader, self._load_version, record, config_file, version
                    )
                    for version in record.versions.values()
                )
            )
            failed = [v for v in record.versions.values() if v.state is not VersionState.READY]
            if failed:
                await self._close_record(record)
                reasons = "; ".join(f"version {v.version}: {v.reason}" for v in failed)
                raise ModelLoadFailedError(self._failed_load(name, reasons))
            previous = self.records.get(name)
            self.records[name] = record
            log.info("model '%s' loaded: versions %s", name, sorted(record.versions))
            self._notify(name)
            if previous is not None:
                await self._close_record(previous)

    def _failed_load(self, name: str, reason: str) -> str:
        current = self.records.get(name)
        keeps = current is not None and current.ready_versions()
        suffix = "; the versions loaded before keep serving" if keeps else ""
        return f"failed to load model '{name}': {reason}{suffix}"

    async def _unload_model(self, name: str) -> None:
        async with self._lock(name):
            previous = self.records.get(name)
            if previous is None:
                raise ModelNotFoundError(f"model '{name}' is not loaded")
            unloaded = ModelRecord(
                name,
                versions={
                    number: VersionRecord(number, VersionState.UNAVAILABLE, "unloaded")
                    for number in previous.versions
                },
                unloaded=True,
            )
            self.records[name] = unloaded
            self._notify(name)
            await self._close_record(previous)
            log.info("model '%s' unloaded", name)

    async def _close_record(self, record: ModelRecord) -> None:
        versions = [v.loaded for v in record.versions.values() if v.loaded is not None]
        for version in versions:
            await version.wait_idle()
        for version in versions:
            version.close()

        def join_all() -> None:
            for version in versions:
                version.join(10)

        await asyncio.to_thread(join_all)

    def _notify(self, name: str) -> None:
        if self.on_change is not None:
            self.on_change(name)

    def fingerprints(self) -> Fingerprints:
        """What poll mode compares: every file of every model folder (path, size, mtime)."""
        prints: Fingerprints = {}
        if not self.root.is_dir():
            return prints
        for folder in sorted(self.root.iterdir()):
            if not folder.is_dir() or folder.name.startswith("."):
                continue
            entries = []
            for path in sorted(folder.rglob("*")):
                try:
                    info = path.stat()
                except OSError:
                    continue
                if path.is_file():
                    entries.append((str(path.relative_to(folder)), info.st_size, info.st_mtime_ns))
            prints[folder.name] = tuple(entries)
        return prints

    async def poll(self, interval: float, known: Fingerprints) -> None:
        """Poll mode: reload changed models, load new ones, unload removed ones, forever.

        `known` is the repository as it was when start-up loading began, so that
        a change made during loading is seen by the first poll.
        """
        known = dict(known)
        while True:
            await asyncio.sleep(interval)
            try:
                await self._poll_once(known)
            except asyncio.CancelledError:
                raise
            except Exception:  # a folder vanishing mid-walk, say: try again next time
                log.exception("repository poll failed; trying again in %.1fs", interval)

    async def _poll_once(self, known: Fingerprints) -> None:
        current = await asyncio.to_thread(self.fingerprints)
        for name, fingerprint in current.items():
            if known.get(name) == fingerprint:
                continue
            known[name] = fingerprint
            log.info("repository poll: model '%s' changed on disk; loading it", name)
            try:
                await self.load_model(name)
            except ServingError as error:
                log.error("repository poll: %s", error.message)
        for name in sorted(set(known) - set(current)):
            del known[name]
            record = self.records.get(name)
            if record is not None and not record.unloaded:
                log.info("repository poll: model '%s' was removed; unloading it", name)
                await self.unload_model(name)

    # ---------------------------------------------------------- resolving ---

    def record(self, name: str) -> ModelRecord:
        if not name:
            raise InvalidInputError("model name is empty")
        record = self.records.get(name)
        if record is None:
            known = sorted(self.records)
            listing = ", ".join(known[:10]) + (", …" if len(known) > 10 else "")
            raise ModelNotFoundError(
                f"unknown model '{name}'" + (f"; this server has: {listing}" if known else "")
            )
        return record

    def resolve(self, name: str, version: str) -> ModelVersion:
        """The version a request addresses; empty version means the newest ready one."""
        record = self.record(name)
        if record.reason:
            raise ModelNotReadyError(f"model '{name}' is not available: {record.reason}")
        if version == "":
            ready = record.ready_versions()
            if not ready:
                reasons = "; ".join(
                    f"version {r.version}: {r.reason or r.state.value.lower()}"
                    for r in record.versions.values()
                )
                raise ModelNotReadyError(f"model '{name}' has no ready version ({reasons})")
            return ready[-1]
        number = parse_version(version)
        found = record.versions.get(number)
        if found is None:
            served = ", ".join(str(v) for v in sorted(record.versions)) or "none"
            raise ModelNotFoundError(
                f"model '{name}' has no version {number}; versions served: {served}"
            )
        if found.state is not VersionState.READY or found.loaded is None:
            detail = found.reason or found.state.value.lower()
            raise ModelNotReadyError(f"model '{name}' version {number} is not ready: {detail}")
        return found.loaded

    async def find(self, name: str, version: str) -> ModelVersion:
        """`resolve` for the inference path, which a front end answers over IPC."""
        return self.resolve(name, version)

    def is_ready(self, name: str, version: str = "") -> bool:
        try:
            self.resolve(name, version)
        except (ModelNotFoundError, ModelNotReadyError, InvalidInputError):
            return False
        return True

    def all_ready(self) -> bool:
        return all(
            record.unloaded
            or (
                not record.reason
                and record.versions
                and all(v.state is VersionState.READY for v in record.versions.values())
            )
            for record in self.records.values()
        )

    def loaded_versions(self) -> Iterator[ModelVersion]:
        for name in sorted(self.records):
            yield from self.records[name].ready_versions()

    def index(self, ready_only: bool) -> list[IndexEntry]:
        entries = []
        if not ready_only and self.root.is_dir():
            # Folders never loaded (explicit mode) are listed too, as Triton does.
            for child in sorted(self.root.iterdir()):
                if (
                    child.is_dir()
                    and not child.name.startswith(".")
                    and (child.name not in self.records)
                ):
                    entries.append(
                        IndexEntry(child.name, "", VersionState.UNAVAILABLE.value, "not loaded")
                    )
        for name in sorted(self.records):
            record = self.records[name]
            if record.reason:
                if not ready_only:
                    entries.append(
                        IndexEntry(name, "", VersionState.UNAVAILABLE.value, record.reason)
                    )
                continue
            for number, version in sorted(record.versions.items()):
                if ready_only and version.state is not VersionState.READY:
                    continue
                entries.append(IndexEntry(name, str(number), version.state.value, version.reason))
        return sorted(entries, key=lambda entry: (entry.name, entry.version))

    def close(self) -> None:
        """Stop every version's scheduler (on the loop); then join() off it."""
        self._loader.shutdown(wait=False, cancel_futures=True)
        for version in self.loaded_versions():
            version.close()

    def join(self, timeout: float) -> None:
        for version in self.loaded_versions():
            version.join(timeout)


def _report_placement(config: mc.ModelConfig, sessions: Sequence[OnnxSession]) -> None:
    """ModelConfig parameters that say what runs the model (Triton has no field for it)."""
    if not sessions[0].on_gpu:
        # --gpu-fallback-to-cpu: the configuration reports where the model really runs.
        for group in config.instance_group:
            if group.kind == mc.ModelInstanceGroup.KIND_GPU:
                group.kind = mc.ModelInstanceGroup.KIND_CPU
                del group.gpus[:]
    config.parameters["execution_provider"].string_value = sessions[0].provider
    config.parameters["execution_devices"].string_value = ",".join(s.device for s in sessions)


def latency_objective(config: mc.ModelConfig) -> float | None:
    """The `latency_objective_ms` parameter: the p99 the operator promises, in seconds.

    Exported as a gauge so the alert rule "p99 above objective" needs no
    per-model copy of the numbers in Prometheus' configuration.
    """
    if "latency_objective_ms" not in config.parameters:
        return None
    text = config.parameters["latency_objective_ms"].string_value.strip()
    try:
        value = float(text)
    except ValueError:
        raise ModelConfigError(
            f"parameter 'latency_objective_ms' is '{text}'; expected a number of milliseconds"
        ) from None
    if value <= 0:
        raise ModelConfigError(f"parameter 'latency_objective_ms' is {value}; expected > 0")
    return value / 1000


def check_model_name(name: str) -> None:
    """One plain folder name: what a client may ask to load or unload."""
    if not name:
        raise InvalidInputError("model name is empty")
    bad = (
        "/" in name
        or "\\" in name
        or "\0" in name
        or name.startswith(".")
        or Path(name).is_absolute()
        or len(name) > 255
    )
    if bad:
        raise InvalidInputError(
            f"model name {name[:80]!r} is not a folder name inside the repository: no path "
            "separators, no leading '.', at most 255 characters"
        )


def is_version_text(text: str) -> bool:
    """ASCII digits only: str.isdigit() also accepts '²' and other scripts' digits."""
    return text.isascii() and text.isdigit()


def parse_version(text: str) -> int:
    if not is_version_text(text) or int(text) < 1:
        raise InvalidInputError(f"model version '{text}' is not a positive integer")
    return int(text)


def _warm_up_instances(loaded: ModelVersion) -> WarmupReport:
    """Warm up every planned shape on every instance thread, all threads at once.

    onnxruntime's CUDA provider keeps per-thread state, and not only handles: on
    an H100, a thread that had run only batch 1 still paid 5x its repeat time for
    its first batch of 3, 5, 7 or 11 after another thread sharing the session had
    run those sizes. So each thread runs the whole plan itself.
    """

    def on_this_thread() -> WarmupReport:
        session = loaded.runner.thread_session()
        report = warm_up(session, loaded.config, loaded.label)
        # A full batch's staging buffers, at the longest length warm-up ran, before serving.
        lengths = [n for n in sequence_lengths(loaded.config, session.graph) if n]
        loaded.runner.reserve_staging(max(lengths, default=None))
        return report

    started = time.perf_counter()
    reports = loaded.scheduler.on_every_instance(on_this_thread)
    failures = [r for r in reports if isinstance(r, BaseException)]
    done = [r for r in reports if isinstance(r, WarmupReport)]
    failure = next((r.failure for r in done if r.failure), None)
    if failures:
        failure = failure or f"warm-up raised {failures[0]!r}"
        log.warning("%s: warm-up failed on an instance: %r", loaded.label, failures[0])
    return WarmupReport(
        sum(r.runs for r in done),
        time.perf_counter() - started,
        tuple(shape for r in done for shape in r.shapes),
        failure,
    )
