"""Every backward rule against float64 finite differences on a tiny graph of its op.

Each case is a graph x -> op(s) -> y with constant weights. The builder appends the
reverse pass of sum(r * y) for a fixed random r; ONNX Runtime runs it in float32 and
the directional derivatives <dx, v> are compared with central differences of the
float64 copy of the forward graph (onnx.reference). Inputs are random, so ties
(max pooling, ReLU at 0) have probability 0 and the derivative exists.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from exporter.errors import ExportError
from exporter.onnx_grad.builder import backward
from exporter.onnx_grad.emit import Emitter
from exporter.onnx_grad.gate import to_float64
from exporter.onnx_grad.graph import GraphInfo
from exporter.onnx_grad.reference_ops import FLOAT64_OPS
from exporter.onnx_grad.rules import RULES

RNG = np.random.default_rng(0)
X4 = [2, 4, 7, 6]  # N, C, H, W: odd sizes catch off-by-one padding and ceil_mode errors


def _w(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


class Case:
    def __init__(self, name: str, x_shape: list[int], nodes: list[onnx.NodeProto],
                 inits: dict[str, np.ndarray] | None = None, positive: bool = False,
                 opset: int = 17) -> None:
        self.name, self.x_shape, self.nodes = name, x_shape, nodes
        self.inits = inits or {}
        self.positive = positive  # inputs > 0 (Log, Sqrt)
        self.opset = opset


def n(op: str, ins: list[str], out: str = "y", **attrs: object) -> onnx.NodeProto:
    return helper.make_node(op, ins, [out], **attrs)


def _i64(*v: int) -> np.ndarray:
    return np.asarray(v, np.int64)


CASES = [
    Case("Gemm", [3, 6], [n("Gemm", ["x", "w", "b"], alpha=0.7, beta=1.3, transB=1)],
         {"w": _w(5, 6), "b": _w(5)}),
    Case("Gemm_transA", [6, 3], [n("Gemm", ["x", "w"], transA=1)], {"w": _w(6, 4)}),
    Case("MatMul", [2, 3, 4], [n("MatMul", ["x", "w"])], {"w": _w(4, 5)}),
    Case("MatMul_both", [2, 3, 3], [n("Sigmoid", ["x"], "s"), n("MatMul", ["x", "s"])]),
    Case("Add_broadcast", X4, [n("Add", ["x", "c"])], {"c": _w(1, 4, 1, 1)}),
    Case("Sub_broadcast", X4, [n("Sub", ["c", "x"])], {"c": _w(6)}),
    Case("Mul_self", X4, [n("Sigmoid", ["x"], "s"), n("Mul", ["x", "s"])]),
    Case("Mul_broadcast_active", X4, [n("ReduceMean", ["x"], "m", axes=[2, 3]),
                                     n("Mul", ["x", "m"])]),
    Case("Div", X4, [n("Sigmoid", ["x"], "s"), n("Add", ["s", "one"], "d"),
                     n("Div", ["x", "d"])], {"one": np.ones(1, np.float32)}),
    Case("Relu", X4, [n("Relu", ["x"])]),
    Case("LeakyRelu", X4, [n("LeakyRelu", ["x"], alpha=0.1)]),
    Case("Sigmoid", X4, [n("Sigmoid", ["x"])]),
    Case("HardSigmoid", X4, [n("HardSigmoid", ["x"], alpha=0.3, beta=0.4)]),
    Case("HardSwish", [2, 4, 7, 6], [n("Mul", ["x", "k"], "x3"), n("HardSwish", ["x3"])],
         {"k": np.asarray(3.0, np.float32)}),
    Case("Clip", X4, [n("Clip", ["x", "lo", "hi"])],
         {"lo": np.asarray(-0.5, np.float32), "hi": np.asarray(0.8, np.float32)}),
    Case("Clip_min_only", X4, [n("Clip", ["x", "lo"])], {"lo": np.asarray(0.1, np.float32)}),
    Case("Tanh", X4, [n("Tanh", ["x"])]),
    Case("Exp", X4, [n("Exp", ["x"])]),
    Case("Log", X4, [n("Log", ["x"])], positive=True),
    Case("Sqrt", X4, [n("Sqrt", ["x"])], positive=True),
    Case("Neg", X4, [n("Neg", ["x"])]),
    Case("Softmax", [3, 5], [n("Softmax", ["x"], axis=-1)]),
    Case("LogSoftmax", [3, 5], [n("LogSoftmax", ["x"], axis=1)]),
    Case("MaxPool_pads_strides_ceil", X4,
         [n("MaxPool", ["x"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
            ceil_mode=1)]),
    Case("MaxPool_overlapping", X4, [n("MaxPool", ["x"], kernel_shape=[3, 2], strides=[1, 1])]),
    Case("MaxPool_2x2_tiles_floor_tail", X4, [n("MaxPool", ["x"], kernel_shape=[2, 2],
                                                strides=[2, 2])]),
    Case("MaxPool_3x3_tiles", [2, 3, 9, 6], [n("MaxPool", ["x"], kernel_shape=[3, 3],
                                                strides=[3, 3])]),
    Case("MaxPool_dilated", X4, [n("MaxPool", ["x"], kernel_shape=[2, 2], dilations=[2, 2])]),
    Case("AveragePool_exclude_pad", X4,
         [n("AveragePool", ["x"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
            count_include_pad=0, ceil_mode=1)]),
    Case("AveragePool_include_pad", X4,
         [n("AveragePool", ["x"], kernel_shape=[3, 2], strides=[2, 1], pads=[1, 0, 1, 1],
            count_include_pad=1)]),
    Case("AveragePool_floor_unused_tail", X4,
         [n("AveragePool", ["x"], kernel_shape=[2, 2], strides=[2, 2])]),
    Case("GlobalAveragePool", X4, [n("GlobalAveragePool", ["x"])]),
    Case("GlobalMaxPool", X4, [n("GlobalMaxPool", ["x"])]),
    Case("ReduceMean", X4, [n("ReduceMean", ["x"], axes=[2, 3], keepdims=0)]),
    Case("ReduceMax", X4, [n("ReduceMax", ["x"], axes=[1], keepdims=1)]),
    Case("ReduceMax_all", X4, [n("ReduceMax", ["x"], keepdims=0)]),
    Case("ReduceSum", X4, [n("ReduceSum", ["x", "ax"], keepdims=0)], {"ax": _i64(1, 3)}),
    Case("Flatten", X4, [n("Flatten", ["x"], axis=1)]),
    Case("Reshape", X4, [n("Reshape", ["x", "s"])], {"s": _i64(0, -1, 6)}),
    Case("Transpose", X4, [n("Transpose", ["x"], perm=[0, 2, 3, 1])]),
    Case("Squeeze_Unsqueeze", [2, 4, 1, 6], [n("Squeeze", ["x", "a"], "s"),
                                             n("Unsqueeze", ["s", "b"])],
         {"a": _i64(2), "b": _i64(1)}),
    Case("Concat", X4, [n("Relu", ["x"], "r"), n("Concat", ["x", "c", "r"], axis=1)],
         {"c": _w(2, 3, 7, 6)}),
    Case("Slice_steps", X4, [n("Slice", ["x", "st", "en", "ax", "sp"])],
         {"st": _i64(1, 5), "en": _i64(7, 0), "ax": _i64(2, 3), "sp": _i64(2, -2)}),
    Case("Slice_channels", X4, [n("Slice", ["x", "st", "en", "ax"])],
         {"st": _i64(1), "en": _i64(3), "ax": _i64(1)}),
    Case("Pad", X4, [n("Pad", ["x", "p"])], {"p": _i64(0, 0, 1, 2, 0, 1, 2, 0)}),
    Case("BatchNormalization", X4, [n("BatchNormalization", ["x", "sc", "b", "m", "v"],
                                      epsilon=1e-3)],
         {"sc": _w(4), "b": _w(4), "m": _w(4), "v": np.abs(_w(4)) + 0.5}),
    Case("Conv_stride_pads", X4, [n("Conv", ["x", "w", "b"], strides=[2, 2], pads=[1, 1, 1, 1])],
         {"w": _w(5, 4, 3, 3), "b": _w(5)}),
    # stride 1: the flipped-kernel Conv rule (uneven pads, a non-square kernel, and none)
    Case("Conv_stride1_flipped", X4, [n("Conv", ["x", "w", "b"], pads=[1, 0, 2, 1])],
         {"w": _w(5, 4, 3, 2), "b": _w(5)}),
    Case("Conv_stride1_valid", X4, [n("Conv", ["x", "w"])], {"w": _w(3, 4, 2, 3)}),
    Case("Conv_groups_dilation", X4,
         [n("Conv", ["x", "w"], group=2, dilations=[2, 1], pads=[1, 0, 2, 1])],
         {"w": _w(6, 2, 3, 2)}),
    Case("Conv_depthwise_stride3", X4, [n("Conv", ["x", "w"], group=4, strides=[3, 2])],
         {"w": _w(4, 1, 2, 3)}),
    Case("Conv_same_upper", X4, [n("Conv", ["x", "w"], strides=[2, 2], auto_pad="SAME_UPPER")],
         {"w": _w(3, 4, 3, 3)}),
    Case("Dropout_Identity", X4, [n("Dropout", ["x"], "d"), n("Identity", ["d"])]),
    Case("Cast", X4, [n("Cast", ["x"], to=TensorProto.FLOAT)]),
    Case("Expand", [2, 4, 1, 1], [n("Expand", ["x", "s"])], {"s": _i64(2, 4, 3, 3)}),
    # transformers and ConvNeXt
    Case("LayerNormalization_tokens", [2, 5, 6],
         [n("LayerNormalization", ["x", "sc", "b"], epsilon=1e-5)], {"sc": _w(6), "b": _w(6)}),
    Case("LayerNormalization_two_axes_with_stats", X4,
         [helper.make_node("LayerNormalization", ["x", "sc"], ["y", "mu", "r"], axis=2)],
         {"sc": _w(7, 6)}),
    Case("Erf", X4, [n("Erf", ["x"])]),
    Case("Gelu_erf", X4, [n("Gelu", ["x"])], opset=20),
    Case("Gelu_tanh", X4, [n("Gelu", ["x"], approximate="tanh")], opset=20),
    Case("Pow_square", X4, [n("Pow", ["x", "two"])], {"two": np.asarray(2.0, np.float32)}),
    Case("Pow_cube_int_exponent", X4, [n("Pow", ["x", "three"])], {"three": _i64(3)}),
    Case("Pow_both", X4, [n("Sigmoid", ["x"], "s"), n("Pow", ["s", "x"])]),
    Case("Reciprocal", X4, [n("Reciprocal", ["x"])], positive=True),
    Case("Where", X4, [n("Greater", ["x", "zero"], "c"), n("Where", ["c", "x", "k"])],
         {"zero": np.zeros(1, np.float32), "k": _w(6)}),
    Case("Gather_class_token", [2, 5, 6], [n("Gather", ["x", "i"], axis=1)],
         {"i": np.asarray(0, np.int64)}),
    Case("Gather_negative_2d_indices", [2, 5, 6], [n("Gather", ["x", "i"], axis=1)],
         {"i": np.asarray([[4, -4], [0, 2]], np.int64)}),
    Case("Gather_repeated", [2, 4, 3], [n("Gather", ["x", "i"], axis=2)],
         {"i": _i64(2, 0, 2)}),
    Case("Split_one_unused", [2, 6, 3], [helper.make_node("Split", ["x", "s"], ["q", "k", "v"],
                                                          axis=1),
                                         n("Mul", ["q", "v"])], {"s": _i64(2, 2, 2)}),
    # a class token's gradient kept compact through token-wise ops (exporter/onnx_grad/rows.py)
    Case("Rows_class_token_mlp_layernorm", [2, 5, 6],
         [n("LayerNormalization", ["x", "sc", "b"], "ln", epsilon=1e-5),
          n("MatMul", ["ln", "w1"], "h"), n("Add", ["h", "b1"], "hb"), n("Gelu", ["hb"], "act"),
          n("MatMul", ["act", "w2"], "m"), n("Add", ["x", "m"], "res"),
          n("Mul", ["res", "pos"], "scaled"), n("Sigmoid", ["scaled"], "s"),
          n("Transpose", ["s"], "t", perm=[1, 0, 2]), n("Gather", ["t", "i"], axis=0)],
         {"sc": _w(6), "b": _w(6), "w1": _w(6, 8), "b1": _w(8), "w2": _w(8, 6),
          "pos": _w(1, 5, 6), "i": np.asarray(0, np.int64)}, opset=20),
    Case("Rows_two_tokens_summed_and_mixed", [2, 5, 6],
         [n("Tanh", ["x"], "t"), n("Gather", ["t", "i0"], "c", axis=1),
          n("Gather", ["t", "i1"], "d", axis=1), n("Add", ["c", "d"], "cd"),
          n("Gather", ["x", "i2"], "e", axis=1), n("Mul", ["cd", "e"])],
         {"i0": np.asarray(0, np.int64), "i1": np.asarray(-1, np.int64),
          "i2": _i64(3)}),
    Case("MatMul_attention_4d", [2, 3, 5, 4],
         [n("Transpose", ["x"], "xt", perm=[0, 1, 3, 2]), n("MatMul", ["x", "xt"], "s"),
          n("Softmax", ["s"], "p", axis=-1), n("MatMul", ["p", "x"])]),
]


def _model(case: Case) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *case.x_shape[1:]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    inits = [numpy_helper.from_array(v, k) for k, v in case.inits.items()]
    graph = helper.make_graph(case.nodes, case.name, [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", case.opset)])


def _with_backward(model: onnx.ModelProto, r: np.ndarray) -> onnx.ModelProto:
    info = GraphInfo.of(model)
    built = onnx.ModelProto.FromString(info.model.SerializeToString())
    em = Emitter(built.graph, info)
    grad = backward(em, info, "x", "y", em.const(r))
    built.graph.output.append(helper.make_tensor_value_info(grad, TensorProto.FLOAT, None))
    return built


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_rule_matches_float64_finite_differences(case: Case) -> None:
    model = _model(case)
    x = RNG.standard_normal(case.x_shape).astype(np.float32)
    if case.positive:
        x = np.abs(x) + 0.5
    forward64 = ReferenceEvaluator(to_float64(model), new_ops=FLOAT64_OPS)
    (y,) = forward64.run(None, {"x": x.astype(np.float64)})
    r = RNG.standard_normal(np.shape(y)).astype(np.float32)
    built = _with_backward(model, r)
    session = ort.InferenceSession(built.SerializeToString(), providers=["CPUExecutionProvider"])
    y32, grad = session.run(None, {"x": x})
    np.testing.assert_allclose(y32, y, rtol=1e-4, atol=1e-5)
    assert grad.shape == x.shape

    def f(xx: np.ndarray) -> float:
        (out,) = forward64.run(None, {"x": xx})
        return float((np.asarray(out) * r.astype(np.float64)).sum())

    step = 1e-6
    for _ in range(4):
        v = RNG.standard_normal(x.shape)
        fd = (f(x + step * v) - f(x - step * v)) / (2 * step)
        dot = float((grad.astype(np.float64) * v).sum())
        assert abs(dot - fd) <= 1e-4 * (np.abs(grad * v).sum() + 1e-6), (case.name, dot, fd)


def test_every_required_op_has_a_rule() -> None:
    required = {"Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Relu", "LeakyRelu", "Sigmoid",
                "HardSigmoid", "HardSwish", "Clip", "MaxPool", "AveragePool", "GlobalAveragePool",
                "GlobalMaxPool", "ReduceMean", "ReduceMax", "Flatten", "Reshape", "Transpose",
                "Squeeze", "Unsqueeze", "Concat", "Slice", "Pad", "BatchNormalization", "Conv",
                "Dropout", "Identity", "Cast"}
    assert required <= set(RULES)
    tested = {node.op_type for case in CASES for node in case.nodes}
    assert set(RULES) <= tested, set(RULES) - tested


def _tie_gradient(nodes: list[onnx.NodeProto], x: np.ndarray, producer: str = "") -> np.ndarray:
    """d(sum of the outputs)/dx."""
    case = Case("tie", list(x.shape), nodes)
    model = _model(case)
    model.producer_name = producer
    (y,) = ReferenceEvaluator(model).run(None, {"x": x})
    built = _with_backward(model, np.ones(np.shape(y), np.float32))
    session = ort.InferenceSession(built.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[1])


def test_tie_conventions_match_pytorch() -> None:
    torch = pytest.importorskip("torch")
    x = np.zeros((1, 1, 2, 2), np.float32)
    x[0, 0, 1, :] = 1.0  # two tied maxima, (1,0) first in row-major order
    xt = torch.tensor(x, requires_grad=True)
    torch.nn.functional.max_pool2d(xt, 2).sum().backward()
    assert xt.grad is not None
    for strides in ([1, 1], [2, 2]):  # the scatter rule and the tiling windows' rule
        mp = _tie_gradient([n("MaxPool", ["x"], kernel_shape=[2, 2], strides=strides)], x)
        np.testing.assert_array_equal(mp, xt.grad.numpy())  # the first maximum
    xt.grad = None
    torch.nn.functional.adaptive_max_pool2d(xt, 1).sum().backward()
    gmp = _tie_gradient([n("GlobalMaxPool", ["x"])], x)
    np.testing.assert_array_equal(gmp, xt.grad.numpy())
    xt.grad = None
    xt.amax(dim=(2, 3), keepdim=True).sum().backward()
    rmax = _tie_gradient([n("ReduceMax", ["x"], axes=[2, 3], keepdims=1)], x)
    np.testing.assert_array_equal(rmax, xt.grad.numpy())  # shared: 0.5 each
    xt.grad = None
    torch.relu(xt - 1.0).sum().backward()  # ReLU at exactly 0: gradient 0 in torch too
    assert float(xt.grad.abs().sum()) == 0.0


def test_global_max_pool_ties_follow_the_producing_framework() -> None:
    x = np.zeros((1, 2, 2, 2), np.float32)
    x[0, 1, 0, 1] = 1.0  # channel 0: four tied zeros; channel 1: one maximum
    gmp = [n("GlobalMaxPool", ["x"])]
    torch_like = _tie_gradient(gmp, x, producer="pytorch")
    tf_like = _tie_gradient(gmp, x, producer="tf2onnx")
    np.testing.assert_array_equal(torch_like[0, 0], [[1.0, 0.0], [0.0, 0.0]])  # first max
    np.testing.assert_array_equal(tf_like[0, 0], np.full((2, 2), 0.25))  # tf.reduce_max
    np.testing.assert_array_equal(torch_like[0, 1], tf_like[0, 1])  # no tie: the same


def test_relu_at_zero_has_gradient_zero() -> None:
    x = np.array([[[[0.0, 1.0], [-1.0, 0.0]]]], np.float32)
    grad = _tie_gradient([n("Relu", ["x"], "r"), n("ReduceSum", ["r"], keepdims=1)], x)
    np.testing.assert_array_equal(grad, [[[[0.0, 1.0], [0.0, 0.0]]]])


def test_an_op_without_a_rule_fails_naming_op_and_node() -> None:
    node = helper.make_node("Softplus", ["x"], ["y"], name="head/softplus")
    with pytest.raises(ExportError, match=r"no backward rule for op 'Softplus' \(node "
                                          r"'head/softplus'\)"):
        _with_backward(_model(Case("softplus", X4, [node])), np.ones(X4, np.float32))

