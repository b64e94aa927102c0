"""exporter/budget.py: the batch that fits, the refusal's message, the estimate's terms
read from a real graph."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from braincam.preprocessing import Preprocessing
from exporter import budget
from exporter.errors import ExportError

PREP = Preprocessing(height=224, width=224, channels=3, scale="unit", layout="nchw")
MiB = budget.MiB


def test_the_batch_is_the_largest_that_fits() -> None:
    def plan(limit: int) -> budget.Estimate:
        return budget.plan(50 * MiB, 100 * MiB, 0, PREP, 100, limit)

    roomy = plan(16 * budget.GiB)
    assert roomy.batch == budget.MAX_BATCH
    tight = plan(roomy.peak(4) + 1)
    assert tight.batch == 4 and tight.peak() <= tight.limit < tight.peak(5)


def test_a_model_over_the_limit_is_refused_with_what_to_do() -> None:
    with pytest.raises(ExportError) as err:
        budget.plan(weights=900 * MiB, activations=300 * MiB, head=0, prep=PREP, images=32,
                    limit=2 * budget.GiB, what="model 'big'")
    message = str(err.value)
    assert "exporting model 'big' needs an estimated ~" in message
    assert "GiB at batch 1 (weights 900 MiB x" in message
    assert "over the memory limit of 2.00 GiB" in message and "--memory-limit" in message


def test_terms_are_read_from_the_graph() -> None:
    w = numpy_helper.from_array(np.zeros((8, 3, 3, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["y"], ["z"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 8, 224, 224])], [w])
    model = helper.make_model(graph)
    assert budget.weight_bytes(model) == 8 * 3 * 3 * 3 * 4
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value or None for d in v.type.tensor_type.shape.dim]
              for v in [*inferred.graph.value_info, *inferred.graph.output]}
    dtypes: dict[str, int] = dict.fromkeys(shapes, int(TensorProto.FLOAT))
    assert budget.activation_bytes(model, shapes, dtypes) == 2 * 8 * 224 * 224 * 4


def test_limit_in_gib() -> None:
    assert budget.parse_limit(4) == 4 * budget.GiB
    with pytest.raises(ValueError):
        budget.parse_limit(0)
