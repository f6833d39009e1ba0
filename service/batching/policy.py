"""Triton's batching and queue configuration, read once when a version loads."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..model_config import ModelConfigError
from ..protocol import model_config_pb2 as mc


@dataclass(frozen=True)
class QueuePolicy:
    """Triton's ModelQueuePolicy for one priority level."""

    max_queue_size: int  # requests; 0 = unbounded
    default_timeout_ns: int  # 0 = none
    allow_timeout_override: bool
    delay_on_timeout: bool

    @staticmethod
    def from_proto(policy: mc.ModelQueuePolicy, default_max_queue_size: int) -> QueuePolicy:
        return QueuePolicy(
            max_queue_size=policy.max_queue_size or default_max_queue_size,
            default_timeout_ns=policy.default_timeout_microseconds * 1000,
            allow_timeout_override=policy.allow_timeout_override,
            delay_on_timeout=policy.timeout_action == mc.ModelQueuePolicy.DELAY,
        )


@dataclass(frozen=True)
class BatchingPolicy:
    merge: bool  # dynamic batching: several requests per run
    max_batch_size: int  # rows per run when merging
    preferred: tuple[int, ...]
    max_delay_ns: int
    preserve_ordering: bool
    levels: int
    default_level: int
    queues: dict[int, QueuePolicy] = field(default_factory=dict)

    @staticmethod
    def from_config(config: mc.ModelConfig, default_max_queue_size: int) -> BatchingPolicy:
        merge = config.WhichOneof("scheduling_choice") == "dynamic_batching"
        batching = config.dynamic_batching
        levels = max(int(batching.priority_levels), 1)
        default_level = int(batching.default_priority_level) or (levels + 1) // 2
        if not 1 <= default_level <= levels:
            raise ModelConfigError(
                f"dynamic_batching default_priority_level is {default_level}; expected 1 to "
                f"{levels} (priority_levels)"
            )
        preferred = tuple(sorted(set(batching.preferred_batch_size)))
        for size in preferred:
            if not 1 <= size <= config.max_batch_size:
                raise ModelConfigError(
                    f"preferred_batch_size {size} is outside 1 to max_batch_size "
                    f"{config.max_batch_size}"
                )
        default_queue = QueuePolicy.from_proto(
            batching.default_queue_policy, default_max_queue_size
        )
        queues = {level: default_queue for level in range(1, levels + 1)}
        for level, policy in batching.priority_queue_policy.items():
            if not 1 <= level <= levels:
                raise ModelConfigError(
                    f"priority_queue_policy names level {level}; expected 1 to {levels}"
                )
            queues[int(level)] = QueuePolicy.from_proto(policy, default_max_queue_size)
        return BatchingPolicy(
            merge=merge and config.max_batch_size > 0,
            max_batch_size=max(config.max_batch_size, 1),
            preferred=preferred,
            max_delay_ns=int(batching.max_queue_delay_microseconds) * 1000,
            preserve_ordering=batching.preserve_ordering,
            levels=levels,
            default_level=default_level,
            queues=queues,
        )
