"""Which operators an ONNX model uses, read off the file without loading its weights.

A model whose graph holds control flow (Loop, If, Scan) can take very
different times on inputs of the same shape, so its past runs say nothing
about its next one: such a model never runs on the event loop (see
`batching.scheduler`). The file is mapped, not read, and only the graph's
structure is walked; initializers are skipped over in place.
"""

from __future__ import annotations

import mmap
from pathlib import Path

from .protowire import LENGTH_DELIMITED, Buffer, walk

CONTROL_FLOW = frozenset({"Loop", "If", "Scan"})

# onnx.proto field numbers.
_MODEL_GRAPH = 7
_MODEL_FUNCTIONS = 25
_GRAPH_NODE = 1
_FUNCTION_NODE = 7
_NODE_OP_TYPE = 4
_NODE_ATTRIBUTE = 5
_ATTRIBUTE_GRAPH = 6
_ATTRIBUTE_GRAPHS = 11


def op_types(path: Path) -> set[str]:
    """Every operator type in the model's graph, its subgraphs and local functions.

    Raises OSError if the file cannot be read and ValueError if it is not a
    well-formed protobuf message.
    """
    with path.open("rb") as file:
        if path.stat().st_size == 0:
            return set()
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                found: set[str] = set()
                for field in walk(view):
                    if field.number == _MODEL_GRAPH and field.wire_type == LENGTH_DELIMITED:
                        _graph_ops(view, field.value, field.end, _GRAPH_NODE, found)
                    elif field.number == _MODEL_FUNCTIONS and field.wire_type == LENGTH_DELIMITED:
                        _graph_ops(view, field.value, field.end, _FUNCTION_NODE, found)
                return found
            finally:
                view.release()


def _graph_ops(data: Buffer, start: int, end: int, node_field: int, found: set[str]) -> None:
    for field in walk(data, start, end):
        if field.number == node_field and field.wire_type == LENGTH_DELIMITED:
            _node_ops(data, field.value, field.end, found)


def _node_ops(data: Buffer, start: int, end: int, found: set[str]) -> None:
    for field in walk(data, start, end):
        if field.wire_type != LENGTH_DELIMITED:
            continue
        if field.number == _NODE_OP_TYPE:
            found.add(bytes(data[field.value : field.end]).decode("utf-8", "replace"))
        elif field.number == _NODE_ATTRIBUTE:
            for attribute in walk(data, field.value, field.end):
                if attribute.wire_type == LENGTH_DELIMITED and attribute.number in (
                    _ATTRIBUTE_GRAPH,
                    _ATTRIBUTE_GRAPHS,
                ):
                    _graph_ops(data, attribute.value, attribute.end, _GRAPH_NODE, found)
