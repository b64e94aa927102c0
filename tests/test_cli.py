"""`braincam` on the command line: predict over a folder of mixed files (PNG, DICOM,
NIfTI, a corrupt image, a text file), its rows against the service's own answers,
overlays, exit codes, the import diet of `predict`, and `info`."""

from __future__ import annotations

import base64
import csv
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from clients import ready_client
from hostile_inputs import brain_slice, dicom, nifti

from braincam.batch import find_inputs
from braincam.cli import main
from braincam.decoding import decode_image, open_image
from braincam.inference import OnnxModel
from service import pipeline
from service.core.config import Settings
from service.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
N_PNG = 4
DICOM_FRAMES = 3
NIFTI_SLICES = 5
TOL = 1e-5  # batched vs single-image ORT runs may differ in the last float bits


@pytest.fixture(scope="module")
def folder(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scans/: 4 demo PNGs, a DICOM, a 3-frame DICOM, a NIfTI volume, junk; sub/: one PNG."""
    root = tmp_path_factory.mktemp("cli") / "scans"
    root.mkdir()
    pngs = sorted((demo_data / "Testing").glob("*/*.png"))
    for src in pngs[:: max(len(pngs) // N_PNG, 1)][:N_PNG]:
        shutil.copy(src, root / f"{src.parent.name}_{src.name}")
    gray = brain_slice(size=64).astype(np.uint16) * 16
    (root / "single.dcm").write_bytes(dicom(gray))
    frames = np.stack([brain_slice(size=64, seed=k).astype(np.uint16) * 16 for k in range(3)])
    (root / "frames.dcm").write_bytes(dicom(frames))
    volume = np.stack(
        [brain_slice(size=64, seed=10 + k).T.astype(np.int16) for k in range(NIFTI_SLICES)],
        axis=2,
    )
    (root / "volume.nii").write_bytes(nifti(volume))
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (root / "notes.txt").write_text("not an image\n")
    (root / ".hidden.png").write_bytes(pngs[0].read_bytes())  # left out: hidden
    (root / "sub").mkdir()
    shutil.copy(pngs[-1], root / "sub" / "deeper.png")
    return root


def _predict(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["predict", *args, "--quiet", "--providers", "CPUExecutionProvider"])
    out = capsys.readouterr()
    return code, out.out, out.err


def _csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(text.splitlines()))


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> OnnxModel:
    return OnnxModel(tiny_model_dir, providers=["CPUExecutionProvider"])


def test_predict_folder_rows_match_the_service(
    folder: Path, tiny_model_dir: Path, model: OnnxModel, capsys: pytest.CaptureFixture[str]
) -> None:
    out = folder.parent / "results.csv"
    code, stdout, err = _predict(capsys, str(folder), "--model-dir", str(tiny_model_dir),
                                 "--out", str(out))
    assert code == 0, err
    assert stdout == ""  # rows went to the file, the summary to stderr
    rows = _csv(out.read_text())
    labels = model.spec.labels
    assert list(rows[0]) == [
        "path", "slice", "label", "confidence", *(f"p_{x}" for x in labels),
        "ood_score", "ood_threshold", "in_distribution", "error"
    ]
    by_name: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_name.setdefault(Path(row["path"]).name, []).append(row)
    # Not recursive: sub/ is left out (and said so); hidden files are skipped.
    assert "deeper.png" not in by_name and ".hidden.png" not in by_name
    assert "1 subdirectory not searched" in err
    assert len(rows) == N_PNG + 1 + DICOM_FRAMES + NIFTI_SLICES + 2
    assert [r["slice"] for r in by_name["frames.dcm"]] == ["0", "1", "2"]
    assert [r["slice"] for r in by_name["volume.nii"]] == [str(k) for k in range(NIFTI_SLICES)]
    assert by_name["notes.txt"][0]["error"].startswith("unsupported_media_type:")
    assert by_name["corrupt.png"][0]["error"].startswith("undecodable_image:")

    good = [r for r in rows if not r["error"]]
    assert len(good) == len(rows) - 2
    for row in good:
        index = int(row["slice"]) if row["slice"] else None
        prepared = pipeline.prepare(Path(row["path"]).read_bytes(), index, model.spec)
        probs = model.predict(prepared.batch)[0]
        assert row["label"] == labels[int(np.argmax(probs))]
        got = [float(row[f"p_{x}"]) for x in labels]
        np.testing.assert_allclose(got, probs, atol=TOL)
        assert float(row["confidence"]) == pytest.approx(float(probs.max()), abs=TOL)

    # ... and the HTTP service says the same for an image and a volume slice.
    settings = Settings(model_dir=tiny_model_dir, providers="CPUExecutionProvider")
    with ready_client(settings) as client:
        for name, index in (("single.dcm", None), ("volume.nii", 3)):
            row = by_name[name][index or 0]
            form = {} if index is None else {"slice": str(index)}
            res = client.post(
                "/predict", files={"file": (name, (folder / name).read_bytes())}, data=form
            )
            assert res.status_code == 200, res.text
            body = res.json()
            assert row["label"] == body["label"]
            # The out-of-distribution verdict is the service's too.
            assert float(row["ood_score"]) == pytest.approx(body["ood_score"], rel=1e-5)
            assert float(row["ood_threshold"]) == body["ood_threshold"]
            assert row["in_distribution"] == str(body["in_distribution"])
            for label in labels:
                assert float(row[f"p_{label}"]) == pytest.approx(
                    body["probabilities"][label], abs=TOL
                )

    assert "skipped: 2 file(s)" in err
    assert "Research use only" in err
    assert f"{len(good)} image(s) classified from 7 file(s)" in err
    assert "unlike the training data (out-of-distribution gate" in err


def test_jsonl_and_batch_size_give_the_same_rows(
    folder: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--model-dir", str(tiny_model_dir), "--recursive"]
    code, stdout, _ = _predict(capsys, str(folder), *base, "--batch-size", "1")
    assert code == 0
    csv_rows = _csv(stdout)  # stdout is CSV when --out is not given
    jsonl = folder.parent / "rows.jsonl"
    code, _, _ = _predict(capsys, str(folder), *base, "--batch-size", "5", "--out", str(jsonl))
    assert code == 0
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["path"] for r in records] == [r["path"] for r in csv_rows]
    # In input order, unreadable files in their place among the batched ones.
    in_order = [str(f.path) for f in find_inputs([folder], recursive=True).files]
    assert list(dict.fromkeys(r["path"] for r in records)) == in_order
    assert any(r["path"].endswith("deeper.png") for r in records)  # --recursive
    for rec, row in zip(records, csv_rows, strict=True):
        assert rec["slice"] == (int(row["slice"]) if row["slice"] else None)
        assert (rec["error"] or "") == row["error"]
        if rec["error"] is None:
            assert rec["label"] == row["label"]
            for label, p in rec["probabilities"].items():
                assert p == pytest.approx(float(row[f"p_{label}"]), abs=TOL)


def test_slices_option(folder: Path, tiny_model_dir: Path,
                       capsys: pytest.CaptureFixture[str]) -> None:
    vols = [str(folder / "frames.dcm"), str(folder / "volume.nii")]
    base = ["--model-dir", str(tiny_model_dir)]
    _, stdout, _ = _predict(capsys, *vols, *base, "--slices", "middle")
    assert [r["slice"] for r in _csv(stdout)] == [str(DICOM_FRAMES // 2), str(NIFTI_SLICES // 2)]
    code, stdout, err = _predict(capsys, *vols, *base, "--slices", "4")
    rows = _csv(stdout)
    assert code == 0  # the NIfTI has a slice 4
    assert rows[0]["error"].startswith("invalid_parameter:") and rows[0]["slice"] == "4"
    assert rows[1]["slice"] == "4" and not rows[1]["error"]
    assert "1 slice(s)" in err


def test_open_image_slices_equal_decode_image(folder: Path) -> None:
    for name in ("frames.dcm", "volume.nii", "single.dcm"):
        data = (folder / name).read_bytes()
        opened = open_image(data)
        assert opened.n_slices == decode_image(data).n_slices
        for k in range(opened.n_slices or 1):
            assert np.array_equal(opened.slice(k).pixels, decode_image(data, k).pixels)


def test_explain_writes_the_services_overlays(
    folder: Path, tiny_model_dir: Path, model: OnnxModel, capsys: pytest.CaptureFixture[str]
) -> None:
    outdir = folder.parent / "overlays"
    pngs = [p for p in sorted(folder.glob("*.png")) if not p.name.startswith(".")]
    files = [str(p) for p in pngs] + [str(folder / "frames.dcm")]
    code, stdout, err = _predict(
        capsys, *files, "--model-dir", str(tiny_model_dir), "--explain", str(outdir),
        "--method", "gradcam++", "--batch-size", "1",
    )
    assert code == 0, err
    rows = _csv(stdout)
    good = [r for r in rows if not r["error"]]
    assert len(good) == N_PNG + DICOM_FRAMES
    assert len(set(r["overlay"] for r in good)) == len(good)
    assert sorted(outdir.rglob("*.png")) == sorted(Path(r["overlay"]) for r in good)
    assert not next(r for r in rows if r["error"])["overlay"]
    params = pipeline.ExplainParams(None, "gradcam++", "jet", 0.4, False, 1)
    for row in good:
        data = Path(row["path"]).read_bytes()
        index = int(row["slice"]) if row["slice"] else None
        written = cv2.imread(row["overlay"], cv2.IMREAD_COLOR)
        assert written.shape[:2] == decode_image(data, index).pixels.shape[:2]
        served = pipeline.explain(model, Metrics(), data, index, params, 0.0)
        assert served.label == row["label"]
        assert np.array_equal(written, _served_overlay(served, row))


def _served_overlay(served: Any, row: dict[str, str]) -> np.ndarray:
    """/explain's overlay (BGR), with the banner the CLI burns into a flagged row's."""
    from braincam.overlay import with_banner

    bgr = cv2.imdecode(
        np.frombuffer(base64.b64decode(served.overlay_png or ""), np.uint8), cv2.IMREAD_COLOR
    )
    if row["in_distribution"] != "False":
        return bgr
    return cv2.cvtColor(with_banner(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)), cv2.COLOR_RGB2BGR)


def test_flagged_overlays_carry_the_banner(
    demo_data: Path, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A noise image the gate flags gets the banner; an image it passes gets none."""
    from braincam.overlay import banner_height

    noise = tmp_path / "noise.png"
    cv2.imwrite(str(noise), np.random.default_rng(0).integers(0, 256, (64, 64), np.uint8))
    scans = sorted((demo_data / "Testing").glob("*/*.png"))
    outdir = tmp_path / "overlays"
    code, stdout, err = _predict(
        capsys, str(noise), *map(str, scans[:6]), "--model-dir", str(tiny_model_dir),
        "--explain", str(outdir),
    )
    assert code == 0, err
    rows = {Path(r["path"]).name: r for r in _csv(stdout)}
    assert rows["noise.png"]["in_distribution"] == "False"
    passed = [r for r in rows.values() if r["in_distribution"] == "True"]
    assert passed  # most demo scans pass the gate
    band = banner_height(64)
    for row in rows.values():
        top = cv2.imread(row["overlay"], cv2.IMREAD_COLOR)[:band].reshape(-1, 3)
        red = float(np.all(top == (32, 0, 176), axis=1).mean())  # BGR of the banner's red
        assert (red > 0.5) == (row["in_distribution"] == "False"), row


def test_explain_by_occlusion_writes_the_services_overlay(
    folder: Path, tiny_model_dir: Path, model: OnnxModel, capsys: pytest.CaptureFixture[str]
) -> None:
    outdir = folder.parent / "occlusion"
    image = sorted(folder.glob("glioma_*.png"))[0]
    code, stdout, err = _predict(
        capsys, str(image), "--model-dir", str(tiny_model_dir), "--explain", str(outdir),
        "--method", "occlusion",
    )
    assert code == 0, err
    (row,) = _csv(stdout)
    params = pipeline.ExplainParams(None, "occlusion", "jet", 0.4, False, 1)
    served = pipeline.explain(model, Metrics(), image.read_bytes(), None, params, 0.0)
    assert served.label == row["label"]
    expected = _served_overlay(served, row)
    assert np.array_equal(cv2.imread(row["overlay"], cv2.IMREAD_COLOR), expected)


def test_a_model_without_a_gradcam_graph_is_explained_by_occlusion(
    folder: Path, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = tmp_path / "classifier-only"
    shutil.copytree(tiny_model_dir, model_dir)
    spec = json.loads((model_dir / "model.json").read_text())
    (model_dir / spec["graphs"]["gradcam"]["file"]).unlink()
    spec["graphs"]["gradcam"] = None
    (model_dir / "model.json").write_text(json.dumps(spec))
    image = str(sorted(folder.glob("glioma_*.png"))[0])
    args = [image, "--model-dir", str(model_dir), "--explain", str(tmp_path / "ov")]
    code, _, err = _predict(capsys, *args, "--method", "gradcam")
    assert code == 2 and "--method occlusion" in err
    code, stdout, err = _predict(capsys, *args)  # the default method is then occlusion
    assert code == 0, err
    assert Path(_csv(stdout)[0]["overlay"]).is_file()


def test_exit_codes(folder: Path, tiny_model_dir: Path, tmp_path: Path,
                    capsys: pytest.CaptureFixture[str]) -> None:
    model_dir = ["--model-dir", str(tiny_model_dir)]
    # Nothing readable: 1, with the reasons.
    code, _, err = _predict(capsys, str(folder / "notes.txt"), str(tmp_path / "nope.png"),
                            *model_dir)
    assert code == 1
    assert "nothing could be read" in err and "not_found" in err
    # Usage errors: 2.
    code, _, err = _predict(capsys, str(folder), *model_dir, "--out", str(tmp_path / "r.xlsx"))
    assert code == 2 and ".csv or .jsonl" in err
    code, _, err = _predict(capsys, str(folder), "--model-dir", str(tmp_path))
    assert code == 2 and "no model.json" in err
    with pytest.raises(SystemExit) as exc:
        _predict(capsys, str(folder), *model_dir, "--batch-size", "0")
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2


def test_find_inputs(folder: Path) -> None:
    flat = find_inputs([folder])
    assert flat.unsearched_dirs == 1
    names = [f.name.as_posix() for f in flat.files]
    assert names == sorted(names) and all(n.startswith("scans/") for n in names)
    assert ".hidden.png" not in " ".join(names)
    deep = find_inputs([folder, folder / "notes.txt"], recursive=True)
    assert len(deep.files) == len(flat.files) + 1  # sub/deeper.png; notes.txt listed once
    assert find_inputs([folder / "missing"]).missing == [folder / "missing"]
    skip = find_inputs([folder], recursive=True, exclude=[folder / "sub"])
    assert [f.name for f in skip.files] == [f.name for f in flat.files]


PREDICT_WITHOUT = textwrap.dedent(
    """
    import importlib.abc, sys

    BLOCKED = {"tensorflow", "keras", "tf_keras", "tf2onnx", "fastapi", "starlette",
               "uvicorn", "service"}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked: braincam predict must not need it")
            return None

    sys.meta_path.insert(0, Block())
    from braincam.cli import main

    code = main(sys.argv[1:])
    loaded = sorted({m.split(".")[0] for m in sys.modules} & BLOCKED)
    assert not loaded, loaded
    sys.exit(code)
    """
)


def test_predict_imports_no_tensorflow_and_no_web_stack(
    folder: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", PREDICT_WITHOUT, "predict", str(folder), "--model-dir",
         str(tiny_model_dir), "--explain", str(tmp_path), "--out", str(tmp_path / "r.csv")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = _csv((tmp_path / "r.csv").read_text())
    assert len(rows) == N_PNG + 1 + DICOM_FRAMES + NIFTI_SLICES + 2


def test_info(tiny_model_dir: Path, model: OnnxModel, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["info", "--model-dir", str(tiny_model_dir), "--providers", "CPUExecutionProvider"]
    assert main(args) == 0
    text = capsys.readouterr().out
    spec = model.spec
    assert ", ".join(spec.labels) in text
    assert spec.explanation.layer in text and "CPUExecutionProvider" in text
    assert "classifier_probabilities_max_abs" in text and "Research use only" in text
    assert main([*args, "--json"]) == 0
    info: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert info["labels"] == spec.labels
    assert info["input"]["shape"] == list(spec.input_shape)
    assert info["explained_layer"] == spec.explanation.layer
    assert info["parity"] == spec.parity
    assert info["providers"]["active"] == ["CPUExecutionProvider"]


def test_info_on_the_shipped_model(capsys: pytest.CaptureFixture[str]) -> None:
    shipped = ROOT / "models" / "demo"
    assert main(["info", "--model-dir", str(shipped), "--providers", "CPUExecutionProvider"]) == 0
    text = capsys.readouterr().out
    spec = OnnxModel(shipped, providers=["CPUExecutionProvider"]).spec
    assert "synthetic demo data" in text and f"notice: {spec.notice}" in text
    accuracy = spec.provenance["test_metrics"]["accuracy"]
    assert f"test accuracy {accuracy:.3f}" in text


def _serve_registered() -> None:
    """`braincam serve` comes from the service's entry point (pyproject.toml): the
    installed metadata carries it once the package is (re)installed."""
    from importlib.metadata import entry_points

    if not [e for e in entry_points(group="braincam.commands") if e.name == "serve"]:
        pytest.skip("the installed braincam metadata has no braincam.commands entry points: "
                    "reinstall the package (make install) to register `braincam serve`")


def test_console_script_and_module_entry() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["braincam"] == "braincam.cli:main"
    assert project["entry-points"]["braincam.commands"]["serve"] == "service.command"
    _serve_registered()
    proc = subprocess.run(
        [sys.executable, "-m", "braincam", "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0
    assert all(name in proc.stdout for name in ("predict", "info", "serve", "dicomweb"))
    proc = subprocess.run(
        [sys.executable, "-m", "braincam", "dicomweb", "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0 and "usage: braincam dicomweb" in proc.stdout


def test_serve_runs_the_service_with_its_options(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import service.__main__ as service_main

    _serve_registered()
    seen: dict[str, str] = {}

    def fake_main() -> int:  # what `python -m service` would read
        settings = Settings()
        seen.update(model_dir=str(settings.model_dir), port=str(settings.port),
                    host=settings.host)
        return 0

    monkeypatch.setattr(service_main, "main", fake_main)
    # Options win over the environment (restored after the test); the rest is the env's.
    monkeypatch.setenv("BRAINCAM_MODEL_DIR", "elsewhere")
    monkeypatch.setenv("BRAINCAM_PORT", "1")
    monkeypatch.setenv("BRAINCAM_HOST", "0.0.0.0")
    assert main(["serve", "--model-dir", str(tiny_model_dir), "--port", "8123"]) == 0
    assert seen == {"model_dir": str(tiny_model_dir), "port": "8123", "host": "0.0.0.0"}


def test_a_command_with_its_own_parser_gets_the_rest_of_the_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The extension point: one registry entry; the module's main(argv) parses the rest."""
    import types

    import braincam.cli as cli

    module = types.ModuleType("braincam_fake_command")
    seen: list[list[str]] = []
    module.main = lambda argv: seen.append(list(argv)) or 7  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    extra = cli.Command("fake", "a command with its own parser", module.__name__, own_parser=True)
    monkeypatch.setattr(cli, "COMMANDS", (*cli.COMMANDS, extra))
    assert main(["fake", "--url", "x", "--help"]) == 7
    assert seen == [["--url", "x", "--help"]]
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "a command with its own parser" in capsys.readouterr().out
