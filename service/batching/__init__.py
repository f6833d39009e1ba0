"""Dynamic batching: the per-version scheduler, its queue, policy and cost model."""

from .policy import BatchingPolicy, QueuePolicy
from .queue import MAX_PADDING_WASTE
from .scheduler import Scheduler

__all__ = ["MAX_PADDING_WASTE", "BatchingPolicy", "QueuePolicy", "Scheduler"]
