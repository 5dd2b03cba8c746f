"""Synthetic light-guide-plate (LGP) data sets on disk; the plates themselves come
from :mod:`station.synthetic` (shared with the ``fake`` camera).

numpy + OpenCV only, so tests and the data loader can use it without
TensorFlow; the same seed gives byte-identical files. What a plate looks like
and how defect sizes are drawn per grade is described in
:mod:`station.synthetic`.

On disk (:func:`write_dataset`) the layout is that of the magnetic-tile data
set: ``<Folder>/<name>.jpg`` (image) + ``<Folder>/<name>.png`` (mask, 0/255),
plus ``plate_groups.json`` mapping each image path (relative to the root) to
its physical plate: a plate is photographed one to three times with different
exposure and noise, and train/validation splits must keep those together.

CLI: ``python -m export.synth OUT_DIR --count N --seed S [--size H W]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np

from station.synthetic import (CLASSES, SEVERITIES, TRAIN_MIX, Plate, capture, check_size, make_plate, make_scene,
                               to_bgr)

from . import ExportError

__all__ = ["CLASSES", "SEVERITIES", "Plate", "make_plate", "to_bgr", "write_dataset", "GROUPS_FILE"]

log = logging.getLogger(__name__)

FOLDERS: dict[str, str] = {"bright_spot": "BrightSpot", "impurity": "Impurity", "scratch": "Scratch"}
FREE_FOLDER = "Free"
GROUPS_FILE = "plate_groups.json"
MANIFEST_FILE = "plates.json"

# --- data set on disk --------------------------------------------------------


def _encode(path: Path, image: np.ndarray, params: list[int]) -> None:
    ok, buf = cv2.imencode(path.suffix, image, params)
    if not ok:  # pragma: no cover - OpenCV always encodes uint8 gray
        raise ExportError(f"{path}: OpenCV could not encode the image")
    path.write_bytes(buf.tobytes())


def write_dataset(
    out_dir: str | Path,
    n: int,
    seed: int,
    size: tuple[int, int] = (256, 256),
    *,
    shots: tuple[int, int] = (1, 3),
    jpeg_quality: int = 95,
    overwrite: bool = False,
    defective: float | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, str]:
    """Write ``n`` plate images with masks under ``out_dir``; return {image path: group}.

    Files: ``<Folder>/lgp<group>_s<shot>.jpg`` (gray JPEG) and ``.png`` (mask,
    0/255), Folder being the plate's main defect class (``Free`` when none);
    ``plate_groups.json`` ({"<Folder>/<name>.jpg": "<Folder>/<group>"}, the
    format of ``tile_groups.json``) and ``plates.json`` (per image: group,
    severity, classes, defect area %). size: (height, width) in pixels. Each
    plate is photographed ``shots`` times (inclusive range); group g depends on
    (seed, g) only, so a larger ``n`` extends a smaller one.
    """
    out = Path(out_dir)
    if n < 1:
        raise ExportError(f"--count {n}: need at least one image")
    if shots[0] < 1 or shots[1] < shots[0]:
        raise ExportError(f"shots {shots}: need 1 <= min <= max")
    if defective is not None and not 0.0 <= defective <= 1.0:
        raise ExportError(f"--defective {defective}: expected a share between 0 and 1")
    height, width = size
    try:
        check_size(height, width)
    except ValueError as exc:
        raise ExportError(f"--size {height} {width}: {exc}") from exc
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out}: directory is not empty (use --overwrite to write into it anyway)")
    out.mkdir(parents=True, exist_ok=True)

    groups: dict[str, str] = {}
    manifest: dict[str, dict[str, object]] = {}
    written = 0
    g = 0
    while written < n:
        rng = np.random.default_rng([seed, g])
        count = int(rng.integers(shots[0], shots[1] + 1))
        scene = make_scene(rng, height, width, _severity(rng, defective))
        folder = FOLDERS[scene.primary] if scene.primary else FREE_FOLDER
        (out / folder).mkdir(exist_ok=True)
        for s in range(min(count, n - written)):
            plate = capture(scene, np.random.default_rng([seed, g, s + 1]))
            name = f"lgp{g:05d}_s{s + 1}"
            _encode(out / folder / f"{name}.jpg", plate.image, [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)])
            _encode(out / folder / f"{name}.png", plate.mask, [cv2.IMWRITE_PNG_COMPRESSION, 3])
            key = f"{folder}/{name}.jpg"
            groups[key] = f"{folder}/{g:05d}"
            manifest[key] = {
                "group": groups[key],
                "severity": scene.severity,
                "classes": list(plate.classes),
                "area_pct": round(plate.area_pct, 4),
            }
            written += 1
            if progress is not None:
                progress(1)
        g += 1
    (out / GROUPS_FILE).write_text(json.dumps(groups, indent=0) + "\n")
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
    log.info("wrote %d plates (%d groups, seed %d, %dx%d) to %s", written, g, seed, height, width, out)
    return groups


def _severity(rng: np.random.Generator, defective: float | None) -> str | None:
    """A plate's severity: None (make_scene draws the training mix) or, with a
    ``defective`` share, "free" or one of the defective severities in the mix's proportions."""
    if defective is None:
        return None
    if rng.random() >= defective:
        return "free"
    names = [n for n in TRAIN_MIX if n != "free"]
    weights = np.array([TRAIN_MIX[n] for n in names])
    return names[int(rng.choice(len(names), p=weights / weights.sum()))]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.synth", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="directory to write <Folder>/<name>.jpg/.png into")
    parser.add_argument("--count", type=int, required=True, help="number of images")
    parser.add_argument("--seed", type=int, required=True, help="random seed (same seed → identical files)")
    parser.add_argument("--size", type=int, nargs=2, default=(256, 256), metavar=("H", "W"), help="image size, pixels")
    parser.add_argument("--shots", type=int, nargs=2, default=(1, 3), metavar=("MIN", "MAX"), help="photos per plate")
    parser.add_argument("--defective", type=float, metavar="P",
                        help="share of plates with a defect (default: the training mix, 0.8)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    try:
        from tqdm import tqdm

        with tqdm(total=args.count, unit="img", disable=None) as bar:
            write_dataset(args.out_dir, args.count, args.seed, tuple(args.size), shots=tuple(args.shots),
                          overwrite=args.overwrite, defective=args.defective, progress=bar.update)
    except ExportError as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
