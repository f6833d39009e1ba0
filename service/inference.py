"""Inference requests in the core's terms, and their validation against a signature.

The grpc codec decodes wire tensors and hands them to `RequestBuilder` one at a
time; the builder checks each against the model's signature in the order a
person debugging a client wants: which tensor, then its name, type, shape,
then its contents. Nothing that fails here reaches onnxruntime.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .datatypes import DATATYPES, DataType, element_count, format_shape, lookup
from .errors import InvalidInputError, RequestTooLargeError
from .model_config import ModelSignature, TensorSpec


@dataclass
class InferenceRequest:
    """A validated request: inputs in the client's shape, ready for execution."""

    request_id: str
    inputs: dict[str, np.ndarray]
    outputs: tuple[str, ...]
    batch_size: int
    received_ns: int
    parameters: dict[str, Any] = field(default_factory=dict)
    # perf_counter_ns() after which the client no longer waits (gRPC deadline); 0 = none.
    deadline_ns: int = 0
    # The id that tags this request's log lines (x-request-id or generated).
    log_id: str = ""


@dataclass(frozen=True)
class OutputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    raw: bytes


@dataclass(frozen=True)
class InferenceResult:
    outputs: tuple[OutputTensor, ...]
    # Set where another version than the one resolved computed it (a front end's request
    # that reached the engine after a new default version replaced that one).
    model_version: int | None = None


_RESERVED = np.empty(0)
# The token input whose values index the vocabulary (service.text's roles).
TOKEN_IDS = "input_ids"


class Tokenizer(Protocol):
    """Turns one request's strings into the model's token inputs (service.text)."""

    @property
    def vocabulary_size(self) -> int: ...

    def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]: ...


class RequestBuilder:
    """Accumulates and checks the tensors of one request for one model version."""

    def __init__(
        self,
        signature: ModelSignature,
        model_label: str,
        tokenizer: Tokenizer | None = None,
        max_elements: int = 0,
    ) -> None:
        self._signature = signature
        # 0 = no limit; otherwise the most tensor elements all inputs together may hold.
        self._max_elements = max_elements
        self._elements = 0
        self._label = model_label
        self._tokenizer = tokenizer
        self._inputs: dict[str, np.ndarray] = {}
        self._batch_size: int | None = None
        self._batch_source = ""
        # graph dim symbol -> (size, input that fixed it)
        self._symbol_sizes: dict[str, tuple[int, str]] = {}

    def check_input(
        self, position: int, name: str, datatype: str, shape: list[int]
    ) -> tuple[TensorSpec, DataType]:
        """Check an input's name, datatype and shape before its contents are decoded.

        On the hot path of every request: messages are built only on failure.
        """
        if not name:
            raise InvalidInputError(f"input at position {position} has no name")
        if name in self._inputs:
            raise InvalidInputError(f"input '{name}' appears more than once in the request")
        spec = self._signature.inputs_by_name.get(name)
        if spec is None:
            expected = ", ".join(s.name for s in self._signature.inputs)
            raise InvalidInputError(
                f"input '{name}' is not an input of {self._label}; its inputs are: {expected}"
            )
        given_type = DATATYPES.get(datatype)
        if given_type is not spec.datatype:
            given_type = lookup(datatype, f"input '{name}'")
            raise InvalidInputError(
                f"input '{name}' has datatype {given_type.name} but {self._label} expects "
                f"{spec.datatype.name}"
            )
        self._check_shape(spec, shape)
        if self._max_elements:
            self._count_elements(name, shape)
        # Reserve the name now so that a duplicate is reported even if decoding fails later.
        self._inputs[name] = _RESERVED
        return spec, given_type

    def _count_elements(self, name: str, shape: list[int]) -> None:
        """Refuse before decoding: a BYTES tensor of many tiny strings costs ~40 bytes of
        memory per element whatever the wire size, so elements are what must be bounded."""
        count = element_count(shape)
        self._elements += count
        if self._elements > self._max_elements:
            raise RequestTooLargeError(
                f"input '{name}' has shape {format_shape(shape)} ({count} elements), which "
                f"brings the request to {self._elements} elements; this server accepts at most "
                f"{self._max_elements} per request (--max-request-elements)"
            )

    def _check_shape(self, spec: TensorSpec, shape: list[int]) -> None:
        signature = self._signature
        batching = signature.batching
        dims = spec.dims
        offset = 1 if batching else 0
        if len(shape) != len(dims) + offset or min(shape, default=0) < 0:
            self._shape_error(spec, shape, None)
        if batching:
            batch = shape[0]
            if batch < 1 or batch > signature.max_batch_size:
                raise InvalidInputError(
                    f"input '{spec.name}' has batch size {batch}; {self._label} accepts 1 to "
                    f"{signature.max_batch_size} (max_batch_size)"
                )
            if self._batch_size is None:
                self._batch_size, self._batch_source = batch, spec.name
            elif batch != self._batch_size:
                raise InvalidInputError(
                    f"input '{spec.name}' has batch size {batch} but input "
                    f"'{self._batch_source}' has {self._batch_size}; all inputs must share the "
                    "batch dimension"
                )
        symbols = spec.symbols
        for axis, wanted in enumerate(dims):
            given = shape[axis + offset]
            if wanted == -1:
                if given < 1:
                    self._shape_error(spec, shape, axis + offset)
                symbol = symbols[axis] if axis < len(symbols) else None
                if symbol is not None:
                    self._check_symbol(
                        f"input '{spec.name}'", axis + offset, symbol, given, spec.name
                    )
            elif given != wanted:
                self._shape_error(spec, shape, axis + offset)

    def _shape_error(self, spec: TensorSpec, shape: list[int], axis: int | None) -> None:
        where = f"input '{spec.name}'"
        expected = spec.client_shape(self._signature.batching)
        if any(dim < 0 for dim in shape):
            raise InvalidInputError(
                f"{where} has shape {format_shape(shape)}; dimensions must not be negative"
            )
        if axis is None:
            raise InvalidInputError(
                f"{where} has shape {format_shape(shape)} but {self._label} expects "
                f"{format_shape(expected)} ({len(expected)} dimensions)"
            )
        wanted = expected[axis]
        raise InvalidInputError(
            f"{where} has shape {format_shape(shape)} but {self._label} expects "
            f"{format_shape(expected)}; dimension {axis} "
            f"must be {'at least 1' if wanted == -1 else wanted}"
        )

    def _check_symbol(self, where: str, axis: int, symbol: str, size: int, name: str) -> None:
        """Dims the graph names alike (e.g. 'sequence') must agree across inputs."""
        seen = self._symbol_sizes.get(symbol)
        if seen is None:
            self._symbol_sizes[symbol] = (size, name)
        elif seen[0] != size:
            raise InvalidInputError(
                f"{where} has size {size} in dimension {axis} but input '{seen[1]}' has "
                f"{seen[0]}; the model ties both to its dimension '{symbol}'"
            )

    def accept(self, spec: TensorSpec, array: np.ndarray) -> None:
        """Store a decoded input, converting BYTES to the text onnxruntime needs."""
        if spec.datatype.is_bytes:
            array = _as_text(spec.name, array)
        self._inputs[spec.name] = array

    def build(
        self,
        request_id: str,
        requested_outputs: list[str],
        received_ns: int,
        parameters: dict[str, Any],
    ) -> InferenceRequest:
        if self._signature.text_input is not None:
            self._tokenize()
        missing = [
            s.name for s in self._signature.inputs if s.name not in self._inputs and not s.optional
        ]
        if missing:
            raise InvalidInputError(
                f"{self._label} needs input(s) {', '.join(repr(m) for m in missing)}, which "
                "the request does not contain"
            )
        outputs = self._check_outputs(requested_outputs)
        batch = self._batch_size if self._batch_size is not None else 1
        return InferenceRequest(request_id, self._inputs, outputs, batch, received_ns, parameters)

    def _tokenize(self) -> None:
        """Text models: exactly one of the text input and the token inputs."""
        text, tokens = self._signature.text_input, self._signature.token_inputs
        assert text is not None
        given = [name for name in tokens if name in self._inputs]
        listing = ", ".join(repr(name) for name in tokens)
        if text in self._inputs:
            if given:
                raise InvalidInputError(
                    f"send either input '{text}' (strings) or the token inputs ({listing}), "
                    "not both"
                )
            if self._tokenizer is None:
                raise InvalidInputError(f"{self._label} cannot tokenize input '{text}'")
            strings = self._inputs.pop(text).reshape(-1)
            self._inputs.update(self._tokenizer.encode([str(s) for s in strings]))
            return
        if not given:
            raise InvalidInputError(
                f"{self._label} needs input '{text}' (one string per row) or the token "
                f"inputs ({listing})"
            )
        missing = [name for name in tokens if name not in self._inputs]
        if missing:
            raise InvalidInputError(
                f"{self._label} needs token input(s) {', '.join(repr(m) for m in missing)} "
                f"alongside {', '.join(repr(g) for g in given)}"
            )
        self._check_token_ids()
        length = self._inputs[given[0]].shape[-1]
        if length > self._signature.max_tokens:
            raise InvalidInputError(
                f"input '{given[0]}' has {length} tokens; {self._label} accepts at most "
                f"{self._signature.max_tokens}"
            )

    def _check_token_ids(self) -> None:
        """Ids index the model's embedding table: onnxruntime's Gather would count a
        negative one from the end, and fail inside the run on one past the end."""
        ids = self._inputs.get(TOKEN_IDS)
        if ids is None or not ids.size or self._tokenizer is None:
            return
        size = self._tokenizer.vocabulary_size
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= size:
            bad = low if low < 0 else high
            raise InvalidInputError(
                f"input '{TOKEN_IDS}' holds token id {bad}; ids must lie in [0, {size}), the "
                f"vocabulary of {self._label}'s tokenizer"
            )

    def _check_outputs(self, requested: list[str]) -> tuple[str, ...]:
        if not requested:
            return tuple(spec.name for spec in self._signature.outputs)
        seen: set[str] = set()
        for name in requested:
            if name in seen:
                raise InvalidInputError(f"output '{name}' is requested more than once")
            if self._signature.output(name) is None:
                expected = ", ".join(s.name for s in self._signature.outputs)
                raise InvalidInputError(
                    f"requested output '{name}' is not an output of {self._label}; its outputs "
                    f"are: {expected}"
                )
            seen.add(name)
        return tuple(requested)


def _as_text(name: str, array: np.ndarray) -> np.ndarray:
    """onnxruntime string tensors hold text; it would mangle arbitrary bytes."""
    flat = array.reshape(-1)
    text = np.empty(flat.shape, dtype=object)
    for index, element in enumerate(flat):
        try:
            text[index] = element.decode("utf-8") if isinstance(element, bytes) else str(element)
        except UnicodeDecodeError:
            raise InvalidInputError(
                f"input '{name}' element {index} is not valid UTF-8; the model's string "
                "tensors hold text"
            ) from None
    return text.reshape(array.shape)
