"""Read-only facts about an ONNX graph: producers, consumers, static shapes, constants.

Shapes come from `onnx.shape_inference` run on a copy whose image input has its
real spatial size and a symbolic batch, so every spatial dimension the backward
rules need is static and only the batch is left open.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx
from onnx import numpy_helper

from exporter.errors import ExportError

Dim = int | None  # None: unknown or symbolic (the batch)
Ties = Literal["pytorch", "tensorflow"]


def tie_convention(model: onnx.ModelProto) -> Ties:
    """Whose gradient convention at ties the model's ops follow: the framework that
    wrote the graph (tf2onnx, which names its graphs "tf2onnx", also inside a braincam
    Keras export: TensorFlow; anything else: PyTorch's)."""
    tf = model.producer_name.startswith("tf2onnx") or model.graph.name == "tf2onnx"
    return "tensorflow" if tf else "pytorch"


def opset_of(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ExportError("the model imports no default ONNX opset")


def node_label(node: onnx.NodeProto) -> str:
    """How an error names a node: its name, else its first output."""
    return node.name or (node.output[0] if node.output else node.op_type)


def _dims(value: onnx.ValueInfoProto) -> list[Dim] | None:
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]


@dataclass
class GraphInfo:
    model: onnx.ModelProto
    opset: int
    producer: dict[str, onnx.NodeProto] = field(default_factory=dict)
    consumers: dict[str, list[onnx.NodeProto]] = field(default_factory=dict)
    shapes: dict[str, list[Dim]] = field(default_factory=dict)
    dtypes: dict[str, int] = field(default_factory=dict)
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    ties: Ties = "pytorch"
    probed: bool = False

    @classmethod
    def of(cls, model: onnx.ModelProto) -> GraphInfo:
        try:
            inferred = onnx.shape_inference.infer_shapes(skeleton(model), data_prop=True)
        except Exception as exc:  # InferenceError and friends: the model is inconsistent
            raise ExportError(f"ONNX shape inference failed on the model: {exc}") from exc
        info = cls(model=model, opset=opset_of(model), ties=tie_convention(model))
        graph = model.graph
        for init in graph.initializer:
            info.constants[init.name] = numpy_helper.to_array(init)
            info.shapes[init.name] = list(init.dims)
            info.dtypes[init.name] = init.data_type
        for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
            dims = _dims(value)
            if dims is not None:
                info.shapes[value.name] = dims
            info.dtypes.setdefault(value.name, value.type.tensor_type.elem_type)
        for node in graph.node:
            for out in node.output:
                if out:
                    info.producer[out] = node
            for inp in node.input:
                if inp:
                    info.consumers.setdefault(inp, []).append(node)
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for attr in node.attribute:
                    if attr.name == "value":
                        info.constants[node.output[0]] = numpy_helper.to_array(attr.t)
        if info._shapes_incomplete():
            info.probe()
        return info

    def _image(self) -> tuple[str, list[int]] | None:
        """The one graph input and its static non-batch dims, if the graph has them."""
        graph = self.model.graph
        inputs = [i.name for i in graph.input if i.name not in self.constants]
        if len(inputs) != 1:
            return None
        dims = self.shapes.get(inputs[0], [])
        if len(dims) < 2 or any(d is None for d in dims[1:]):
            return None
        return inputs[0], [int(d) for d in dims[1:] if d is not None]

    def _shapes_incomplete(self) -> bool:
        """A node output without a shape, or with more unknown axes than the batch."""
        return any(
            out not in self.shapes or sum(d is None for d in self.shapes[out]) > 1
            for node in self.model.graph.node for out in node.output if out
        )

    def probe(self) -> None:
        """Fill shapes and shape-derived constants from ONNX Runtime runs (probe.py)."""
        from exporter.onnx_grad.probe import probe

        image = self._image()
        if self.probed or image is None:
            return
        self.probed = True
        shapes, values = probe(self.model, *image, arrays=self.constants)
        for name, dims in shapes.items():
            known = self.shapes.get(name)
            if known is None or len(known) != len(dims):
                self.shapes[name] = dims
            else:  # keep inference's symbolic batch, take the probe's static sizes
                self.shapes[name] = [k if k is not None else d for k, d in zip(known, dims,
                                                                                strict=True)]
        for name, value in values.items():
            self.constants.setdefault(name, value)

    @property
    def nodes(self) -> list[onnx.NodeProto]:
        return list(self.model.graph.node)

    def shape(self, name: str) -> list[Dim]:
        if name not in self.shapes:
            raise ExportError(f"ONNX shape inference gave no shape for tensor {name!r}")
        return self.shapes[name]

    def rank(self, name: str) -> int:
        return len(self.shape(name))

    def static_dims(self, name: str, axes: list[int], node: onnx.NodeProto) -> list[int]:
        """The sizes of `axes` of a tensor, which a rule needs to be known."""
        shape = self.shape(name)
        out = [shape[a] for a in axes]
        if any(d is None for d in out):
            raise ExportError(
                f"{node.op_type} node {node_label(node)!r}: the size of axes {axes} of "
                f"{name!r} is not static ({shape}); the backward rule needs it"
            )
        return [int(d) for d in out if d is not None]

    def const(self, name: str, node: onnx.NodeProto, what: str) -> np.ndarray:
        """The value of an input that must be a constant (an initializer or Constant)."""
        if name not in self.constants:
            self.probe()  # computed from shapes only: a constant at this input size
        if name in self.constants:
            return self.constants[name]
        raise ExportError(
            f"{node.op_type} node {node_label(node)!r}: its {what} ({name!r}) is computed at run "
            "time; the backward rule needs it constant"
        )

    def optional_const(self, node: onnx.NodeProto, index: int, what: str) -> np.ndarray | None:
        if len(node.input) <= index or not node.input[index]:
            return None
        return self.const(node.input[index], node, what)


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its large initializers as stubs (name, type, dims; data declared
    external): what shape inference and ONNX Runtime need to see, without serialising
    a real model's hundreds of MB of weights once more."""
    graph = model.graph
    inits = [i if _elements(i) <= INLINE_ELEMENTS else weight_stub(i) for i in graph.initializer]
    out = onnx.helper.make_model(
        onnx.helper.make_graph(list(graph.node), graph.name, list(graph.input),
                               list(graph.output), inits, value_info=list(graph.value_info)),
        opset_imports=list(model.opset_import), ir_version=model.ir_version,
        functions=list(model.functions),
    )
    out.producer_name = model.producer_name
    return out


INLINE_ELEMENTS = 1 << 12  # initializers up to this size are kept (shapes, axes, scalars)


def _elements(tensor: onnx.TensorProto) -> int:
    return int(np.prod(tensor.dims)) if tensor.dims else 1


def weight_stub(tensor: onnx.TensorProto) -> onnx.TensorProto:
    """An initializer's name, type and dims, its data declared external."""
    stub = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
    stub.data_location = onnx.TensorProto.EXTERNAL
    stub.external_data.add(key="location", value="in-memory")
    return stub


def session_in_place(model: onnx.ModelProto, outputs: list[str],
                     arrays: dict[str, np.ndarray] | None = None,
                     nodes: list[onnx.NodeProto] | None = None, priority: bool = False) -> Any:
    """An ONNX Runtime session (CPU) computing `outputs` of the model (`nodes` in place
    of its own, where given), its large weights read from the arrays in place: no
    serialised copy of them. `arrays`: the initializers as arrays, where the caller
    holds them already. `priority`: run nodes in the graph's order (ORT's default
    order holds tensors read by late nodes, such as a probe's Shape of each)."""
    import onnxruntime as ort

    light = skeleton(model)
    if nodes is not None:
        del light.graph.node[:]
        light.graph.node.extend(nodes)
    del light.graph.output[:]
    light.graph.output.extend(onnx.helper.make_empty_tensor_value_info(o) for o in outputs)
    stubs = [i.name for i in light.graph.initializer
             if i.data_location == onnx.TensorProto.EXTERNAL]
    arrays = arrays or {}
    by_name = {i.name: i for i in model.graph.initializer}
    weights = [np.ascontiguousarray(arrays[n] if n in arrays else numpy_helper.to_array(by_name[n]))
               for n in stubs]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if priority:
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    options.add_external_initializers(stubs, [ort.OrtValue.ortvalue_from_numpy(w)
                                              for w in weights])
    session = ort.InferenceSession(light.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    session.weights = weights  # the arrays ORT reads must outlive the session
    return session


def attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def attr_ints(node: onnx.NodeProto, name: str, default: list[int] | None = None) -> list[int]:
    value = attr(node, name)
    if value is None:
        return list(default or [])
    return [int(v) for v in value]  # type: ignore[attr-defined]


def attr_int(node: onnx.NodeProto, name: str, default: int) -> int:
    value = attr(node, name)
    return default if value is None else int(value)  # type: ignore[call-overload]


def attr_float(node: onnx.NodeProto, name: str, default: float) -> float:
    value = attr(node, name)
    return default if value is None else float(value)  # type: ignore[arg-type]


def attr_str(node: onnx.NodeProto, name: str, default: str) -> str:
    value = attr(node, name)
    if value is None:
        return default
    return value.decode() if isinstance(value, bytes) else str(value)
