"""Reading a series: order along the slice normal, one series per upload, non-images
skipped, and every bound (zip entries, declared size, compression ratio, paths, slices,
pixels) refused before anything is inflated or decoded."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from braincam.errors import ImageTooLarge, InvalidParameter, PayloadTooLarge
from braincam.series import SeriesLimits, read_series, unzip
from tests.dicom_series import demo_slices, mr_series, shuffled_names, text_sr, zipped
from tests.hostile_inputs import nifti

LABELS = ["notumor", "glioma", "meningioma", "pituitary", "notumor", "glioma", "notumor"]


@pytest.fixture(scope="module")
def synthetic(demo_data: Path):  # type: ignore[no-untyped-def]
    return mr_series(demo_slices(demo_data, LABELS))


@pytest.mark.parametrize("oblique", [False, True])
def test_slices_ordered_along_the_normal(demo_data: Path, oblique: bool) -> None:
    """Shuffled files with shuffled names and reversed InstanceNumbers come back in
    geometric order, also for a tilted stack."""
    s = mr_series(demo_slices(demo_data, LABELS), oblique=oblique)
    series = read_series(shuffled_names(s.files, seed=3))
    assert series.ordered_by == "position"
    assert [sl.sop_instance_uid for sl in series.slices] == s.instance_uids
    positions = [sl.position for sl in series.slices]
    assert all(p is not None for p in positions)
    assert np.allclose(np.diff(np.array(positions, dtype=float)), 5.0, atol=1e-3)


def test_pixels_match_the_single_file_decoder(synthetic) -> None:  # type: ignore[no-untyped-def]
    from braincam.decoding import decode_image

    series = read_series(synthetic.files)
    for sl, (_, data) in zip(series.slices, synthetic.files, strict=True):
        np.testing.assert_array_equal(sl.pixels, decode_image(data).pixels)


def test_zip_and_loose_files_agree(synthetic) -> None:  # type: ignore[no-untyped-def]
    files = shuffled_names(synthetic.files, seed=1)
    packed = read_series([("series.zip", zipped([(f"a/b/{n}", d) for n, d in files]))])
    assert [s.sop_instance_uid for s in packed.slices] == synthetic.instance_uids


def test_non_images_skipped_and_counted(synthetic) -> None:  # type: ignore[no-untyped-def]
    files = [
        *synthetic.files,
        ("report.dcm", text_sr(synthetic.study_uid)),
        ("README.txt", b"not a DICOM file"),
        ("__MACOSX/._IM0000.dcm", b"\x00\x05\x16\x07"),
    ]
    series = read_series(files)
    assert len(series.slices) == len(synthetic.files)
    assert series.skipped == {"not_an_image": 1, "not_dicom": 2}


def test_mixed_series_refused_naming_them(demo_data: Path, synthetic) -> None:  # type: ignore[no-untyped-def]
    other = mr_series(demo_slices(demo_data, ["glioma", "notumor"]), description="FLAIR")
    with pytest.raises(InvalidParameter) as err:
        read_series([*synthetic.files, *other.files])
    assert err.value.status_code == 422
    assert synthetic.series_uid in err.value.detail and other.series_uid in err.value.detail
    assert "FLAIR" in err.value.detail


def test_other_plane_refused(demo_data: Path, synthetic) -> None:  # type: ignore[no-untyped-def]
    tilted = mr_series(
        demo_slices(demo_data, ["glioma"]), series_uid=synthetic.series_uid, oblique=True
    )
    with pytest.raises(InvalidParameter, match="another plane"):
        read_series([*synthetic.files, *tilted.files])


def test_nifti_volume_slices(demo_data: Path) -> None:
    from braincam.decoding import decode_image

    volume = np.stack(demo_slices(demo_data, LABELS[:5]), axis=2).astype(np.int16)
    data = nifti(volume)
    series = read_series([("t1.nii", data)])
    assert series.format == "nifti" and series.ordered_by == "volume"
    assert len(series.slices) == 5
    for k in (0, 4):
        np.testing.assert_array_equal(series.slices[k].pixels, decode_image(data, k).pixels)


def _no_inflate():  # type: ignore[no-untyped-def]
    """Fails the test if any zip entry is opened (i.e. inflated)."""
    return mock.patch.object(
        zipfile.ZipFile, "open", side_effect=AssertionError("inflated before the bounds")
    )


def test_zip_bomb_by_ratio_refused_before_inflating() -> None:
    data = zipped([("bomb.dcm", bytes(8 << 20))])  # 8 MiB of zeros: ~1000x
    assert len(data) < 64 * 1024
    with _no_inflate(), pytest.raises(PayloadTooLarge, match="compression ratio") as err:
        read_series([("upload.zip", data)])
    assert err.value.status_code == 413


def test_zip_total_size_refused_before_inflating() -> None:
    rng = np.random.default_rng(0)
    data = zipped([(f"f{i}.dcm", rng.bytes(300_000)) for i in range(4)])  # incompressible
    with _no_inflate(), pytest.raises(PayloadTooLarge, match="would inflate to"):
        read_series([("upload.zip", data)], SeriesLimits(max_zip_bytes=1_000_000))


def test_too_many_zip_entries_refused_before_inflating() -> None:
    data = zipped([(f"f{i}.dcm", b"x") for i in range(30)])
    with _no_inflate(), pytest.raises(PayloadTooLarge, match="30 files"):
        read_series([("upload.zip", data)], SeriesLimits(max_zip_entries=20))


@pytest.mark.parametrize(
    "name", ["../evil.dcm", "a/../../evil.dcm", "/etc/passwd", "C:/x.dcm", "a\\..\\b.dcm"]
)
def test_unsafe_zip_paths_refused(name: str) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(zipfile.ZipInfo(name), b"data")
    with _no_inflate(), pytest.raises(InvalidParameter, match="unsafe path") as err:
        read_series([("upload.zip", buf.getvalue())])
    assert err.value.status_code == 422


def test_dotted_names_are_not_traversal(synthetic) -> None:  # type: ignore[no-untyped-def]
    files = [(f"..series/.{name}..", data) for name, data in synthetic.files[:2]]
    assert len(read_series([("upload.zip", zipped(files))]).slices) == 2


def test_entry_larger_than_declared_refused() -> None:
    """A central directory that understates an entry's size cannot smuggle more bytes."""
    data = bytearray(zipped([("a.dcm", b"A" * 5000)], compression=zipfile.ZIP_STORED))
    # Patch the declared uncompressed size in both headers down to 100 bytes.
    for sig, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = data.find(sig)
        data[at + offset : at + offset + 4] = (100).to_bytes(4, "little")
    with pytest.raises(Exception) as err:
        unzip(bytes(data), SeriesLimits())
    assert getattr(err.value, "status_code", None) == 422


def test_too_many_slices_refused_before_decoding(synthetic) -> None:  # type: ignore[no-untyped-def]
    with (
        mock.patch("braincam.series.decode_dicom_dataset", side_effect=AssertionError),
        pytest.raises(PayloadTooLarge, match="slice limit"),
    ):
        read_series(synthetic.files, SeriesLimits(max_slices=3))


def test_too_many_pixels_refused_before_decoding(synthetic) -> None:  # type: ignore[no-untyped-def]
    with (
        mock.patch("braincam.series.decode_dicom_dataset", side_effect=AssertionError),
        pytest.raises(ImageTooLarge, match="MP limit"),
    ):
        read_series(synthetic.files, SeriesLimits(max_total_pixels=64 * 64 * 3))


def test_multi_frame_instance_without_geometry() -> None:
    """A multi-frame DICOM with no patient geometry: its frames, in stored order."""
    from braincam.decoding import decode_image
    from tests.hostile_inputs import dicom

    frames = np.stack([np.full((16, 16), 100 * (k + 1), np.uint16) for k in range(3)])
    frames[:, 4:8, 4:8] = 4000
    data = dicom(frames)
    series = read_series([("mf.dcm", data)])
    assert series.ordered_by == "upload" and len(series.slices) == 3
    assert [s.frame for s in series.slices] == [0, 1, 2]
    for k, s in enumerate(series.slices):
        np.testing.assert_array_equal(s.pixels, decode_image(data, k).pixels)
