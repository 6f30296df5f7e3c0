"""The graph checks of an ONNX model: ``onnx.checker`` on a copy without the
initializers' bytes, its nodes in topological order.

The copy holds each initializer whose bytes :mod:`robustpatch.onnx.model` has checked
itself (``raw_data`` of shape × dtype bytes, an external range inside the data file) as
an empty stub of the same name and type, so the checker never reads a data file
(whatever the folder's name is, UTF-8 or not) and never holds the weights a second
time. Nodes are sorted first: onnxruntime runs a graph in any order its edges allow,
and its float16 converter appends the input casts at the end of ``graph.node``; a
graph with a cycle keeps its order, which the checker then refuses. A tensor stored in
external data that is not an initializer of the main graph (a Constant's, saved with
``convert_attribute=True``) is refused first: only those initializers are located,
checked and pointed at the output's data file.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import FormatError

__all__ = ["check_graph", "sort_nodes", "sorted_nodes"]

#: Longest checker message repeated in an error line (it may dump a whole node).
_MESSAGE_CHARS = 300


def check_graph(onnx: Any, proto: Any, path: Path, checked: set[str]) -> None:
    """``onnx.checker`` on ``proto`` with the initializers named in ``checked`` (whose
    bytes were checked already) as stubs and its nodes sorted: FormatError naming
    ``path`` and the checker's complaint."""
    elsewhere = _external_outside_initializers(proto)
    if elsewhere:
        raise FormatError(
            f"{path}: {elsewhere} is stored in external data, which robustpatch reads for "
            "the graph's initializers only: re-save the model with "
            "onnx.save_model(..., save_as_external_data=True, convert_attribute=False)"
        )
    light = _without_bytes(onnx, proto, checked)
    try:
        onnx.checker.check_model(light)
    except (onnx.checker.ValidationError, UnicodeDecodeError) as e:  # a name not UTF-8
        raise FormatError(f"{path}: not a valid ONNX model: {_message(e)}") from None


def _message(e: Exception) -> str:
    """The checker's message on one line, cut to a readable length."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= _MESSAGE_CHARS else text[: _MESSAGE_CHARS - 1] + "…"


def _without_bytes(onnx: Any, proto: Any, checked: set[str]) -> Any:
    """A copy of ``proto`` for the checker: stubs for the ``checked`` initializers,
    nodes in topological order (where there is one)."""
    light = onnx.ModelProto()
    _copy_fields(proto, light, skip=("graph",))
    _copy_fields(proto.graph, light.graph, skip=("initializer", "node"))
    light.graph.node.extend(sorted_nodes(proto.graph) or proto.graph.node)
    for t in proto.graph.initializer:
        light.graph.initializer.append(_stub(onnx, t) if t.name in checked else t)
    return light


def _copy_fields(src: Any, dst: Any, skip: tuple[str, ...]) -> None:
    """Copy every field set in message ``src`` to ``dst`` but those named in ``skip``."""
    for fd, value in src.ListFields():
        if fd.name in skip:
            continue
        if hasattr(value, "CopyFrom"):  # a message
            getattr(dst, fd.name).CopyFrom(value)
        elif hasattr(value, "extend"):  # a repeated field
            getattr(dst, fd.name).extend(value)
        else:
            setattr(dst, fd.name, value)


def _stub(onnx: Any, t: Any) -> Any:
    """An initializer of ``t``'s name and type with no elements (the checker accepts a
    tensor of zero elements that holds no value)."""
    stub = onnx.TensorProto()
    stub.name, stub.data_type = t.name, t.data_type
    stub.dims.append(0)
    return stub


def _external_outside_initializers(proto: Any) -> str | None:
    """Where the first tensor stored in external data that is not an initializer of the
    main graph is (a node attribute's, a subgraph's initializer, a sparse initializer);
    None if there is none. Only the main graph's initializers are located and checked,
    and pointed at the output's data file: any other would be read from wherever its
    location resolves."""
    tensors = _tensors_outside_initializers(proto)
    return next((where for t, where in tensors if t.data_location == _EXTERNAL), None)


_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


def _tensors_outside_initializers(proto: Any) -> Iterator[tuple[Any, str]]:
    """Every TensorProto of the model but the main graph's initializers, with where."""
    yield from _graph_tensors(proto.graph, top=True)
    for f in proto.functions:
        for node in f.node:
            yield from _node_tensors(node, f"function {f.name!r}")


def _graph_tensors(g: Any, top: bool) -> Iterator[tuple[Any, str]]:
    if not top:
        for t in g.initializer:
            yield t, f"initializer {t.name!r} of subgraph {g.name!r}"
    for sp in g.sparse_initializer:
        yield from _sparse(sp, f"sparse initializer {sp.values.name!r}")
    for node in g.node:
        yield from _node_tensors(node, f"graph {g.name!r}")


def _node_tensors(node: Any, where: str) -> Iterator[tuple[Any, str]]:
    for attr in node.attribute:
        what = f"attribute {attr.name!r} of node {node.name or node.op_type!r} ({where})"
        if attr.HasField("t"):
            yield attr.t, what
        for t in attr.tensors:
            yield t, what
        if attr.HasField("sparse_tensor"):
            yield from _sparse(attr.sparse_tensor, what)
        for sp in attr.sparse_tensors:
            yield from _sparse(sp, what)
        for sub in _subgraphs(attr):
            yield from _graph_tensors(sub, top=False)


def _sparse(sp: Any, what: str) -> Iterator[tuple[Any, str]]:
    yield sp.values, what
    yield sp.indices, what


# ---------------------------------------------------------------------------- node order


def sorted_nodes(graph: Any) -> list[Any] | None:
    """``graph``'s nodes, each after the nodes whose outputs it reads (in a subgraph of
    its attributes too), otherwise in their order in the file; None if the edges make
    a cycle."""
    nodes = list(graph.node)
    producer: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for name in node.output:
            if name:
                producer.setdefault(name, i)
    waits_for = [0] * len(nodes)
    readers: list[list[int]] = [[] for _ in nodes]
    for i, node in enumerate(nodes):
        for j in {producer[n] for n in _reads(node) if n in producer} - {i}:
            waits_for[i] += 1
            readers[j].append(i)
    ready = [i for i, n in enumerate(waits_for) if n == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for k in readers[i]:
            waits_for[k] -= 1
            if waits_for[k] == 0:
                heapq.heappush(ready, k)
    return [nodes[i] for i in order] if len(order) == len(nodes) else None


def _reads(node: Any) -> Iterator[str]:
    """The value names ``node`` reads: its inputs and those of its subgraphs' nodes."""
    yield from node.input
    for attr in node.attribute:
        for g in _subgraphs(attr):
            for inner in g.node:
                yield from _reads(inner)


def _subgraphs(attr: Any) -> Iterable[Any]:
    if attr.HasField("g"):
        yield attr.g
    yield from attr.graphs


def sort_nodes(onnx: Any, graph: Any) -> None:
    """Put ``graph``'s nodes in topological order in place (a cycle: left as it is)."""
    ordered = sorted_nodes(graph)
    if ordered is None:
        return
    copies = []
    for node in ordered:
        c = onnx.NodeProto()
        c.CopyFrom(node)
        copies.append(c)
    del graph.node[:]
    graph.node.extend(copies)
