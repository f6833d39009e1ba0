"""Text in, token ids out: the server tokenizes raw strings for text models.

Triton needs an ensemble with a Python-backend tokenizer for this; here it is a
few lines of config.pbtxt `parameters` (see `TextInputConfig.from_config`). The
client sends one string per row in a BYTES input; the server tokenizes with
the model's `tokenizer.json` (the fast `tokenizers` library), pads each request
to its longest row and fills the graph's `input_ids`, `attention_mask` and
`token_type_ids`. Clients that tokenize themselves send those inputs directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .datatypes import DATATYPES
from .errors import InvalidInputError
from .inference import TOKEN_IDS
from .model_config import (
    GraphSignature,
    ModelConfigError,
    ModelSignature,
    TensorSpec,
    check_padding_can_be_undone,
)
from .protocol import model_config_pb2 as mc

# Graph inputs the tokenizer can fill, by the names exporters give them.
ROLES = (TOKEN_IDS, "attention_mask", "token_type_ids")
_INTEGER_TYPES: dict[str, type[np.integer]] = {
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


def _parameter(config: mc.ModelConfig, key: str) -> str | None:
    if key in config.parameters:
        return config.parameters[key].string_value.strip()
    return None


@dataclass(frozen=True)
class TextInputConfig:
    """The `parameters` that turn text input on for a model."""

    input_name: str
    tokenizer: Path
    max_length: int
    truncate: bool
    # graph input name -> (role, numpy dtype)
    targets: tuple[tuple[str, str, type[np.integer]], ...]

    @staticmethod
    def from_config(
        config: mc.ModelConfig, graph: GraphSignature, folders: Sequence[Path]
    ) -> TextInputConfig | None:
        """Read `text_input`, `tokenizer`, `max_sequence_length`, `truncation`.

        `tokenizer` is looked up in the version folder first, then the model
        folder, so a version can bring its own vocabulary.
        """
        name = _parameter(config, "text_input")
        if name is None:
            return None
        if not name:
            raise ModelConfigError("parameter 'text_input' is empty; name the BYTES input to add")
        if config.max_batch_size < 1:
            raise ModelConfigError("text input needs a batching model (max_batch_size > 0)")
        if graph.input(name) is not None:
            raise ModelConfigError(f"text_input '{name}' clashes with a model input of that name")
        filename = _parameter(config, "tokenizer") or "tokenizer.json"
        found = next(
            (
                f / filename
                for f in folders
                if (f / filename).resolve().is_relative_to(folders[-1].resolve())
                and (f / filename).is_file()
            ),
            None,
        )
        if found is None:
            raise ModelConfigError(f"tokenizer '{filename}' was not found in the model folder")
        length_text = _parameter(config, "max_sequence_length") or "512"
        try:
            max_length = int(length_text)
        except ValueError:
            raise ModelConfigError(
                f"parameter 'max_sequence_length' is '{length_text}'; expected an integer"
            ) from None
        if max_length < 2:
            raise ModelConfigError(f"parameter 'max_sequence_length' is {max_length}; expected ≥ 2")
        truncation = (_parameter(config, "truncation") or "true").lower()
        if truncation not in ("true", "false"):
            raise ModelConfigError(
                f"parameter 'truncation' is '{truncation}'; expected true or false"
            )
        targets: list[tuple[str, str, type[np.integer]]] = []
        for tensor in graph.inputs:
            if tensor.name not in ROLES:
                raise ModelConfigError(
                    f"text input fills {', '.join(ROLES)}, but the model also needs '{tensor.name}'"
                )
            dtype = _INTEGER_TYPES.get(tensor.ort_type)
            if dtype is None or len(tensor.shape) != 2 or tensor.shape[1] is not None:
                raise ModelConfigError(
                    f"input '{tensor.name}' must be an int32/int64 [batch, sequence] tensor "
                    "with a dynamic sequence dimension for text input"
                )
            targets.append((tensor.name, tensor.name, dtype))
        if not any(role == TOKEN_IDS for _, role, _ in targets):
            raise ModelConfigError("text input needs a model input named 'input_ids'")
        return TextInputConfig(name, found, max_length, truncation == "true", tuple(targets))


class TextEncoder:
    """Tokenizes the strings of one request into padded token-id arrays."""

    def __init__(self, settings: TextInputConfig) -> None:
        from tokenizers import Tokenizer  # only text models need it

        self.settings = settings
        try:
            self._tokenizer = Tokenizer.from_file(str(settings.tokenizer))
        except Exception as error:  # tokenizers raises a plain Exception on bad JSON
            raise ModelConfigError(
                f"tokenizer '{settings.tokenizer.name}' could not be read: {error}"
            ) from None
        self._tokenizer.no_padding()
        self.vocabulary_size: int = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self._tokenizer.enable_truncation(settings.max_length)
        self.pad_id = self._tokenizer.padding["pad_id"] if self._tokenizer.padding else 0
        for token in ("[PAD]", "<pad>"):
            found = self._tokenizer.token_to_id(token)
            if found is not None:
                self.pad_id = found
                break

    def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Token arrays [rows, longest row] for the graph inputs this model has."""
        encodings = self._tokenizer.encode_batch(list(texts))
        if not self.settings.truncate:
            for row, encoding in enumerate(encodings):
                if encoding.overflowing:
                    raise InvalidInputError(
                        f"input '{self.settings.input_name}' row {row} is longer than the "
                        f"model's {self.settings.max_length} tokens (truncation is off)"
                    )
        length = max(len(e.ids) for e in encodings)
        arrays: dict[str, np.ndarray] = {}
        for name, role, dtype in self.settings.targets:
            pad = self.pad_id if role == TOKEN_IDS else 0
            array = np.full((len(encodings), length), pad, dtype=dtype)
            for row, encoding in enumerate(encodings):
                values = {
                    TOKEN_IDS: encoding.ids,
                    "attention_mask": encoding.attention_mask,
                    "token_type_ids": encoding.type_ids,
                }[role]
                array[row, : len(values)] = values
            arrays[name] = array
        return arrays


def with_text_input(
    config: mc.ModelConfig, signature: ModelSignature, settings: TextInputConfig, pad_id: int
) -> tuple[mc.ModelConfig, ModelSignature]:
    """Add the BYTES text input to the config clients see and to the signature.

    Text and token inputs are alternatives, so all of them are marked optional;
    the request builder insists on exactly one of the two kinds. Token inputs
    become paddable (pad id, mask 0), so texts of different lengths share batches.
    """
    text_spec = TensorSpec(settings.input_name, DATATYPES["BYTES"], (1,), optional=True)
    token_names = {name for name, _, _ in settings.targets}
    inputs = tuple(
        replace(spec, optional=True) if spec.name in token_names else spec
        for spec in signature.inputs
    )
    completed = mc.ModelConfig()
    completed.CopyFrom(config)
    for entry in completed.input:
        if entry.name in token_names:
            entry.optional = True
    completed.input.add(name=settings.input_name, data_type=mc.TYPE_STRING, dims=[1], optional=True)
    pad_values = dict(signature.pad_values)
    for name, role, _ in settings.targets:
        pad_values.setdefault(name, float(pad_id) if role == TOKEN_IDS else 0.0)
    check_padding_can_be_undone(replace(signature, pad_values=pad_values))
    return completed, replace(
        signature,
        pad_values=pad_values,
        inputs=(text_spec, *inputs),
        text_input=settings.input_name,
        token_inputs=tuple(sorted(token_names)),
        max_tokens=settings.max_length,
    )
