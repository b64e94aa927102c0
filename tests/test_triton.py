"""`python -m exporter triton`: a Triton model repository from an exported model
directory. The configs are parsed with Triton's own protobuf schema (tritonclient's
model_config_pb2, strict text format) and compared with the ONNX graphs read
independently (onnx, not the exporter's ONNX Runtime reading); the written graphs
must load and run from the repository alone."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from braincam.inference import OnnxModel
from braincam.model_spec import load_spec, save_spec, sha256_file
from exporter.triton import (
    CONFIG_FILE,
    GRADCAM_SUFFIX,
    LABELS_FILE,
    TritonExportError,
    graph_file,
    write_repository,
)
from service.inference_protocol import GRADCAM_SUFFIX as SERVICE_GRADCAM_SUFFIX
from service.inference_protocol import protocol_models

ROOT = Path(__file__).resolve().parents[1]
CPU = "CPUExecutionProvider"
ONNX_TO_TRITON = {
    onnx.TensorProto.FLOAT: mc.TYPE_FP32,
    onnx.TensorProto.INT64: mc.TYPE_INT64,
}


def _config(path: Path) -> mc.ModelConfig:
    # text_format.Parse rejects unknown fields, wrong types and bad enum names.
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def _graph_io(path: Path) -> dict[str, dict[str, tuple[int, list[int | str]]]]:
    """{inputs|outputs: {name: (elem_type, dims)}} from the ONNX proto itself."""
    graph = onnx.load(str(path), load_external_data=False).graph

    def dims(value: onnx.ValueInfoProto) -> list[int | str]:
        return [d.dim_value if d.HasField("dim_value") else d.dim_param
                for d in value.type.tensor_type.shape.dim]  # fmt: skip

    return {
        kind: {v.name: (v.type.tensor_type.elem_type, dims(v)) for v in values}
        for kind, values in (("inputs", graph.input), ("outputs", graph.output))
    }


@pytest.fixture(scope="module")
def repo(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("triton") / "models"
    write_repository(tiny_model_dir, root, max_batch_size=16, queue_delay_us=500)
    return root


def _check_tensors(
    configured: list[mc.ModelInput] | list[mc.ModelOutput],
    graph: dict[str, tuple[int, list[int | str]]],
) -> None:
    assert {t.name for t in configured} == set(graph)
    for tensor in configured:
        elem_type, dims = graph[tensor.name]
        assert isinstance(dims[0], str), f"{tensor.name}: batch dimension must be dynamic"
        assert tensor.data_type == ONNX_TO_TRITON[elem_type], tensor.name
        if len(dims) == 1:  # [N]: Triton wants dims [1] reshaped to []
            assert list(tensor.dims) == [1] and tensor.HasField("reshape"), tensor.name
            assert list(tensor.reshape.shape) == []
        else:
            assert list(tensor.dims) == dims[1:], tensor.name
            assert not tensor.HasField("reshape"), tensor.name


def test_configs_match_the_graphs(repo: Path, tiny_model_dir: Path) -> None:
    spec = load_spec(tiny_model_dir)
    models = {spec.name: "classifier.onnx", spec.name + GRADCAM_SUFFIX: "gradcam.onnx"}
    assert sorted(p.name for p in repo.iterdir()) == sorted(models)
    for name, graph in models.items():
        config = _config(repo / name / CONFIG_FILE)
        io = _graph_io(tiny_model_dir / graph)
        assert config.name == name
        assert config.backend == "onnxruntime" and config.platform == "onnxruntime_onnx"
        assert config.max_batch_size == 16
        assert config.HasField("dynamic_batching")
        assert config.dynamic_batching.max_queue_delay_microseconds == 500
        assert [g.kind for g in config.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]
        (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
        assert accelerator.name == "cuda"
        _check_tensors(list(config.input), io["inputs"])
        _check_tensors(list(config.output), io["outputs"])
        (warmup,) = config.model_warmup
        assert set(warmup.inputs) == set(io["inputs"]) and warmup.batch_size == 1
        for tensor in config.input:
            assert list(warmup.inputs[tensor.name].dims) == list(tensor.dims)
            assert warmup.inputs[tensor.name].data_type == tensor.data_type
        # The ONNX file Triton loads is the exported one, byte for byte.
        written = graph_file(repo / name / "1")
        assert sha256_file(written) == sha256_file(tiny_model_dir / graph)
        assert json.loads((repo / name / "model.json").read_text())["name"] == spec.name
    classifier = _config(repo / spec.name / CONFIG_FILE)
    probs, score = classifier.output  # the probabilities and the out-of-distribution score
    assert (probs.name, score.name) == ("probabilities", "ood_score")
    assert probs.label_filename == LABELS_FILE and not score.label_filename
    labels = (repo / spec.name / LABELS_FILE).read_text().splitlines()
    assert labels == spec.labels  # Triton's classification extension: one label per class


def test_repository_runs_on_its_own(repo: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    """Copied elsewhere (as to object storage), each graph still finds its weights."""
    moved = tmp_path / "elsewhere"
    shutil.copytree(repo, moved)
    model = OnnxModel(tiny_model_dir, providers=[CPU])
    name = model.spec.name
    x = np.random.default_rng(1).random((3, *model.spec.input_shape), dtype=np.float32)
    classifier = ort.InferenceSession(str(graph_file(moved / name / "1")), providers=[CPU])
    (probs,) = classifier.run(["probabilities"], {"image": x})
    np.testing.assert_array_equal(probs, model.predict(x))
    gradcam = ort.InferenceSession(
        str(graph_file(moved / (name + GRADCAM_SUFFIX) / "1")), providers=[CPU]
    )
    target = np.array([-1, 0, 1], dtype=np.int64)
    cls, grads = gradcam.run(["class_index", "gradients"], {"image": x, "target": target})
    want = model.gradcam(x, target)
    np.testing.assert_array_equal(cls, want.class_index)
    np.testing.assert_array_equal(grads, want.gradients)


def test_names_and_tensors_match_the_services_oip_models(repo: Path, tiny_model_dir: Path) -> None:
    """A client moves between the service and Triton by changing the URL only."""
    assert GRADCAM_SUFFIX == SERVICE_GRADCAM_SUFFIX
    served = protocol_models(OnnxModel(tiny_model_dir, providers=[CPU]))
    assert set(served) == {p.name for p in repo.iterdir()}
    for name, oip in served.items():
        config = _config(repo / name / CONFIG_FILE)
        for configured, described in ((config.input, oip.inputs), (config.output, oip.outputs)):
            got = {t.name: (mc.DataType.Name(t.data_type)[5:], list(t.dims)) for t in configured}
            want = {t.name: (t.datatype, t.shape[1:] or [1]) for t in described}
            assert got == want, name


def test_cpu_kind_and_inline_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A model directory without weights.bin becomes plain 1/model.onnx files."""
    inline = tmp_path / "inline"
    inline.mkdir()
    spec = load_spec(tiny_model_dir)
    for graph in (spec.graphs.classifier, spec.graphs.gradcam):
        proto = onnx.load(str(tiny_model_dir / graph.file))  # pulls the external data in
        onnx.save(proto, str(inline / graph.file))
        graph.sha256 = sha256_file(inline / graph.file)
        graph.size_bytes = (inline / graph.file).stat().st_size
    spec.graphs.weights = None
    spec.name = "inline_model"
    save_spec(spec, inline)
    repo = write_repository(inline, tmp_path / "repo", kind="cpu", version=3, instances=2)
    assert repo.version == 3
    for model in repo.models:
        assert (model.directory / "3" / "model.onnx").is_file()
        config = _config(model.config)
        (group,) = config.instance_group
        assert group.kind == mc.ModelInstanceGroup.KIND_CPU and group.count == 2
        assert not config.HasField("optimization")


def test_refusals(repo: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in repo.rglob("*")}
    with pytest.raises(TritonExportError, match="exists"):
        write_repository(tiny_model_dir, repo)
    assert {p: p.stat().st_mtime_ns for p in repo.rglob("*")} == before
    with pytest.raises(TritonExportError, match="Triton model name"):
        write_repository(tiny_model_dir, tmp_path / "a", name="no/slashes")
    with pytest.raises(TritonExportError, match="max_batch_size"):
        write_repository(tiny_model_dir, tmp_path / "b", max_batch_size=0)
    # A graph that no longer matches its recorded sha256 is not published.
    tampered = tmp_path / "tampered"
    shutil.copytree(tiny_model_dir, tampered)
    with (tampered / "classifier.onnx").open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ValueError, match="sha256"):
        write_repository(tampered, tmp_path / "c")
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())
    # --overwrite replaces this model's entries and leaves other models alone.
    (repo / "someone-else").mkdir()
    write_repository(tiny_model_dir, repo, overwrite=True)
    assert (repo / "someone-else").is_dir()
    (repo / "someone-else").rmdir()


CLI = textwrap.dedent(
    """
    import importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"tensorflow", "keras", "tf2onnx", "tritonclient"}:
                raise ImportError(f"{name} is blocked")
            return None

    sys.meta_path.insert(0, Block())
    from exporter.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def test_cli_needs_no_tensorflow(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "repo"
    args = ["triton", "--model-dir", str(tiny_model_dir), "--repo", str(out), "--kind", "cpu"]
    proc = subprocess.run(
        [sys.executable, "-c", CLI, *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "verified" in proc.stdout
    name = load_spec(tiny_model_dir).name
    assert _config(out / name / CONFIG_FILE).instance_group[0].kind == (
        mc.ModelInstanceGroup.KIND_CPU
    )
    again = subprocess.run(
        [sys.executable, "-c", CLI, *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 1 and "exists" in again.stderr
