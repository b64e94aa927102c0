"""How long does /explain spend encoding its image?  PNG levels vs Pillow vs JPEG.

    python benchmarks/bench_encoders.py [--image scan.png] [--repeats 30]

Encodes one overlay (650x591 by default, the size of a typical upload) and one
3-panel image built from it, with the same `braincam.overlay` code the service
uses, and prints for each encoder the median time and output size, both also
relative to the service's default (`encode_png` at DEFAULT_PNG_COMPRESSION).
Without --image a synthetic MRI-like slice (noisy tissue texture, as real scans
have) stands in; noise-free synthetic images compress unrealistically well.

`encode_png` = zlib level + a fixed SUB filter; "cv2 png level N" rows are the
same level with libpng's adaptive filter choice. The default level was chosen
from this run: see DEFAULT_PNG_COMPRESSION in braincam/overlay.py.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from braincam.cam import resize_cam
from braincam.decoding import load_image
from braincam.overlay import (
    DEFAULT_PNG_COMPRESSION,
    blend,
    colorize,
    encode_png,
    panels,
    to_rgb,
)

LEVELS = (0, 1, 3, 6, 9)


def synthetic_slice(
    width: int = 650, height: int = 591, noise: float = 6.0, seed: int = 0
) -> np.ndarray:
    """uint8 gray brain-like slice: skull ring, textured tissue, a bright lesion, noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    cx, cy, rx, ry = width / 2, height / 2, width * 0.38, height * 0.42
    r = np.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)
    img: np.ndarray = np.zeros((height, width), np.float32)
    brain = r < 0.92
    img[brain] = 90 + 25 * np.sin(xx[brain] / 9.0) * np.cos(yy[brain] / 11.0)  # gyri-like
    img[(r >= 0.95) & (r < 1.0)] = 200  # skull
    lesion = ((xx - cx * 1.25) ** 2 + (yy - cy * 0.8) ** 2) < (width * 0.07) ** 2
    img[lesion] = 170
    img = cv2.GaussianBlur(img, (0, 0), 1.5)
    img += rng.normal(0, noise, img.shape).astype(np.float32) * (0.4 + brain)  # scanner noise
    return np.clip(img, 0, 255).astype(np.uint8)


def synthetic_cam(width: int, height: int, cells: int = 10) -> np.ndarray:
    """A coarse CAM (as from a 10x10 layer) upsampled to the image, as the service does."""
    yy, xx = np.mgrid[0:cells, 0:cells].astype(np.float32)
    cam: np.ndarray = np.exp(-((xx - 6.3) ** 2 + (yy - 3.8) ** 2) / 4.0) + 0.3 * np.exp(
        -((xx - 3) ** 2 + (yy - 6) ** 2) / 6.0
    )
    return resize_cam((cam / cam.max()).astype(np.float32), (width, height))


def timed(fn: Callable[[], bytes], repeats: int) -> tuple[float, int]:
    """Median wall time in ms over `repeats` runs (after one warm-up), and output bytes."""
    out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), len(out)


def encoders(rgb: np.ndarray) -> dict[str, Callable[[], bytes]]:
    """Every candidate, keyed by a printable name."""
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)

    def cv2_png(level: int) -> bytes:  # libpng's adaptive per-row filter choice
        return cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, level])[1].tobytes()

    found: dict[str, Callable[[], bytes]] = {}
    for level in LEVELS:
        found[f"cv2 png level {level}"] = partial(cv2_png, level)
    for level in LEVELS:
        found[f"encode_png level {level} (SUB)"] = partial(encode_png, rgb, level)
    # cv2 with no parameters: level 1, SUB filter, RLE strategy (its speed preset).
    found["cv2 png no params"] = lambda: cv2.imencode(".png", bgr)[1].tobytes()
    try:
        from PIL import Image

        pil = Image.fromarray(rgb)

        def pil_png(level: int) -> bytes:
            buf = io.BytesIO()
            pil.save(buf, format="PNG", compress_level=level)
            return buf.getvalue()

        found["Pillow png level 1"] = partial(pil_png, 1)
        found["Pillow png level 6 (its dflt)"] = partial(pil_png, 6)
    except ImportError:
        print("(Pillow not installed: skipped)")

    def cv2_jpeg(quality: int) -> bytes:
        return cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()

    for quality in (90, 95):
        found[f"cv2 jpeg q{quality}"] = partial(cv2_jpeg, quality)
    return found


def report(title: str, rgb: np.ndarray, repeats: int) -> None:
    raw = rgb.nbytes
    results = {name: timed(fn, repeats) for name, fn in encoders(rgb).items()}
    ref = f"encode_png level {DEFAULT_PNG_COMPRESSION} (SUB)"
    ref_ms, ref_size = results[ref]
    h, w = rgb.shape[:2]
    print(f"\n{title}: {w}x{h} RGB, raw {raw / 1024:.0f} KiB, median of {repeats} runs")
    print(f"ratios are relative to the default, {ref}")
    print(f"{'encoder':<31} {'ms':>8} {'time x':>7} {'KiB':>7} {'size x':>7} {'raw/out':>8}")
    for name, (ms, size) in results.items():
        print(
            f"{name:<31} {ms:8.2f} {ms / ref_ms:7.2f} {size / 1024:7.0f} "
            f"{size / ref_size:7.2f} {raw / size:8.1f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, help="an MRI slice instead of the synthetic one")
    parser.add_argument("--width", type=int, default=650)
    parser.add_argument("--height", type=int, default=591)
    parser.add_argument("--noise", type=float, default=6.0, help="synthetic noise sigma (0-255)")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)

    cv2.setNumThreads(1)  # PNG/JPEG encoding is single-threaded; keep resize comparable
    if args.image:
        image = load_image(args.image)
    else:
        image = synthetic_slice(args.width, args.height, args.noise)
    base = to_rgb(image)
    h, w = base.shape[:2]
    heat = colorize(synthetic_cam(w, h), "jet")
    overlay = blend(base, heat, 0.4)
    report("overlay", overlay, args.repeats)
    report("3-panel", panels(base, heat, overlay), args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
