"""Correctness under concurrency: whatever batches form, every request gets its own answer.

Hypothesis draws waves of concurrent requests with random row counts,
sequence lengths, priorities and deadlines and sends each wave at once to a
batching, padding model. Every response must equal that request's own
unbatched result; none may be lost, duplicated or swapped. A request may fail
only with DEADLINE_EXCEEDED, and only if it had a deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import tritonclient.grpc.aio as aioclient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.utils import InferenceServerException

from tests import onnx_models as models
from tests.conftest import ServerThread, serve

CONFIG = """
max_batch_size: 16
dynamic_batching {
  max_queue_delay_microseconds: 2000
  priority_levels: 3
  default_priority_level: 2
  default_queue_policy { allow_timeout_override: true }
}
instance_group [ { count: 2 } ]
parameters { key: "padding" value: { string_value: "tokens:0, mask:0" } }
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    root = tmp_path_factory.mktemp("properties")
    models.save(models.sleepy_tokens(), root, "tokens", config=CONFIG)
    with serve(root) as running:
        yield running


@dataclass(frozen=True)
class Spec:
    rows: int
    length: int
    priority: int
    deadline: float | None
    steps: int
    seed: int


specs = st.builds(
    Spec,
    rows=st.integers(1, 4),
    length=st.integers(1, 12),
    priority=st.integers(0, 3),
    deadline=st.sampled_from([None, None, 30.0, 0.002]),
    steps=st.sampled_from([0, 0, 0, 200, 2000]),
    seed=st.integers(0, 2**31 - 1),
)


def tokens_for(spec: Spec) -> np.ndarray:
    return (
        np.random.default_rng(spec.seed)
        .standard_normal((spec.rows, spec.length))
        .astype(np.float32)
    )


async def send(client: aioclient.InferenceServerClient, index: int, spec: Spec) -> object:
    tokens = tokens_for(spec)
    arrays = {
        "tokens": tokens,
        "mask": np.ones_like(tokens),
        "steps": np.full((spec.rows, 1), spec.steps, np.int64),
    }
    inputs = []
    for name, array in arrays.items():
        tensor = aioclient.InferInput(
            name, list(array.shape), "INT64" if name == "steps" else "FP32"
        )
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    try:
        return await client.infer(
            "tokens",
            inputs,
            request_id=f"req-{index}",
            priority=spec.priority,
            client_timeout=spec.deadline,
        )
    except InferenceServerException as error:
        return error


async def wave(url: str, batch: list[Spec]) -> list[object]:
    async with aioclient.InferenceServerClient(url) as client:
        return await asyncio.gather(*(send(client, i, s) for i, s in enumerate(batch)))


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(batch=st.lists(specs, min_size=1, max_size=40))
def test_every_response_is_its_own_request_result(server: ServerThread, batch: list[Spec]) -> None:
    outcomes = asyncio.run(wave(server.url, batch))
    assert len(outcomes) == len(batch)
    for index, (spec, outcome) in enumerate(zip(batch, outcomes, strict=True)):
        if isinstance(outcome, InferenceServerException):
            assert outcome.status() == "StatusCode.DEADLINE_EXCEEDED", outcome
            assert spec.deadline is not None and spec.deadline < 1
            continue
        assert outcome.get_response().id == f"req-{index}"  # type: ignore[attr-defined]
        tokens = tokens_for(spec)
        doubled = outcome.as_numpy("doubled")  # type: ignore[attr-defined]
        mean = outcome.as_numpy("mean")  # type: ignore[attr-defined]
        assert doubled.shape == tokens.shape and mean.shape == (spec.rows, 1)
        np.testing.assert_allclose(doubled, 2 * tokens, atol=1e-5)
        np.testing.assert_allclose(mean[:, 0], tokens.mean(axis=1), atol=1e-5)


def test_waves_like_these_really_batch_and_pad(server: ServerThread) -> None:
    """Guard against the property passing because nothing was ever batched or padded."""
    before = server.server.registry.resolve("tokens", "").stats.snapshot()
    busy = [Spec(1, 4, 0, None, 20_000, seed) for seed in range(2)]  # both instances
    rest = [Spec(2, 3 + seed % 6, 0, None, 0, seed) for seed in range(30)]
    outcomes = asyncio.run(wave(server.url, busy + rest))
    assert not any(isinstance(outcome, InferenceServerException) for outcome in outcomes)
    after = server.server.registry.resolve("tokens", "").stats.snapshot()
    executions = after.execution_count - before.execution_count
    assert executions < len(busy) + len(rest)
    assert after.padded_elements > before.padded_elements
