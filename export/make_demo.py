"""Reproduce the bundled demo model and the sample images, end to end.

::

    python -m export.make_demo [--work .make/demo]

1. 600 synthetic light-guide plates, 256 × 256, seed 7 (:mod:`export.synth`)
   into ``WORK/data``;
2. a narrow U-Net (MobileNetV2 alpha 0.35, 128 × 128 gray input, default
   preprocessing: gray → CLAHE → dilation → resize → normalize) trained on
   them with seed 7, split by plate (:mod:`export.train`) into ``WORK/run``;
3. the ONNX file, card embedded, copied to ``station/assets/demo_seg.onnx`` and
   the training curves to ``docs/demo_training.png``;
4. eight sample plates from another seed (1007), none of them seen in
   training, of several sizes and aspect ratios, two of them in colour,
   covering PASS, DISCOUNT and REJECT, written to ``samples/`` with
   ``samples/samples.json`` (truth defect area and grade, and what the demo
   model finds).

Takes about three and a half minutes on two CPU cores (training about 3); the weights,
figures and samples are the same on every run on the same software versions (only the
wall-clock seconds on the card, and so the ONNX bytes, differ).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from station.imageio import read_image
from station.modelcard import MaskOutput, ModelCard
from station.preprocess import preprocess, to_tensor

from . import ExportError
from .card import PreprocessOptions, preprocess_ops
from .synth import GROUPS_FILE, make_plate, to_bgr, write_dataset

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
ASSET = REPO / "station" / "assets" / "demo_seg.onnx"
CURVES = REPO / "docs" / "demo_training.png"
SAMPLES = REPO / "samples"
COMMAND = "python -m export.make_demo"

DATA_SEED = 7
TRAIN_SEED = 7
SAMPLE_SEED = 1007
COUNT = 600
PLATE_SIZE = (256, 256)
INPUT_SIZE = (128, 128)
ALPHA = 0.35
EPOCHS = 18
BATCH = 16
LR = 2e-3
MAX_BYTES = 10_000_000

# Default grading rules of station: total defect area, % of the inspected surface.
PASS_MAX_PCT = 0.5
DISCOUNT_MAX_PCT = 2.0


@dataclass(frozen=True)
class SampleSpec:
    name: str  # file name
    height: int
    width: int
    colour: bool
    severity: str  # export.synth severity: free / small → PASS, medium → DISCOUNT, large → REJECT


SAMPLE_SPECS: tuple[SampleSpec, ...] = (
    SampleSpec("plate1_256x256.png", 256, 256, False, "free"),
    SampleSpec("plate2_240x320.png", 240, 320, False, "small"),
    SampleSpec("plate3_300x300.jpg", 300, 300, False, "medium"),
    SampleSpec("plate4_200x400.png", 200, 400, False, "large"),
    SampleSpec("plate5_384x256.png", 384, 256, False, "medium"),
    SampleSpec("plate6_256x384_colour.jpg", 256, 384, True, "medium"),
    SampleSpec("plate7_480x360.png", 480, 360, False, "large"),
    SampleSpec("plate8_192x256_colour.png", 192, 256, True, "large"),
)


def grade(area_pct: float) -> str:
    """PASS / DISCOUNT / REJECT by total defect area (% of the image), station's default rules."""
    if area_pct <= PASS_MAX_PCT:
        return "PASS"
    return "DISCOUNT" if area_pct <= DISCOUNT_MAX_PCT else "REJECT"


def predicted_area_pct(session, card: ModelCard, image: np.ndarray) -> float:
    """Defect area (% of the source image) the model finds: probabilities above the
    card's threshold, mapped back to the source frame through the preprocessing geometry."""
    assert isinstance(card.output, MaskOutput)  # the demo model segments
    x, geometry = preprocess(image, card)
    (prob,) = session.run([card.output.name], {card.input.name: to_tensor(x, card.input)})
    mask = (prob[0, :, :, 0] > card.output.threshold).astype(np.float32)
    source = geometry.to_source(mask) >= 0.5
    return 100.0 * float(np.count_nonzero(source)) / source.size


def write_samples(out_dir: Path, model_path: Path, seed: int = SAMPLE_SEED) -> list[dict[str, object]]:
    """Write :data:`SAMPLE_SPECS` into ``out_dir`` and ``samples.json``; return the manifest rows."""
    import onnxruntime as ort

    from .onnx_export import read_card

    card = read_card(model_path)
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, object]] = []
    for i, spec in enumerate(SAMPLE_SPECS):
        plate = make_plate(np.random.default_rng([seed, i]), spec.height, spec.width, spec.severity)
        image = to_bgr(plate.image) if spec.colour else plate.image
        path = out_dir / spec.name
        params = [cv2.IMWRITE_JPEG_QUALITY, 95] if path.suffix == ".jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 6]
        ok, buf = cv2.imencode(path.suffix, image, params)
        if not ok:  # pragma: no cover
            raise ExportError(f"{path}: OpenCV could not encode the sample")
        path.write_bytes(buf.tobytes())
        found = predicted_area_pct(session, card, read_image(path))
        rows.append({
            "file": spec.name,
            "height": spec.height,
            "width": spec.width,
            "colour": "bgr" if spec.colour else "gray",
            "classes": list(plate.classes),
            "truth_area_pct": round(plate.area_pct, 3),
            "truth_grade": grade(plate.area_pct),
            "demo_model_area_pct": round(found, 3),
            "demo_model_grade": grade(found),
        })
        log.info("sample %s: truth %.3f %% %s; demo model %.3f %% %s", spec.name, plate.area_pct,
                 grade(plate.area_pct), found, grade(found))
    manifest = {
        "made_by": COMMAND,
        "seed": seed,
        "note": "synthetic light-guide plates from export/synth.py, not used in training; grades by the default "
                f"rules (PASS <= {PASS_MAX_PCT} %, DISCOUNT <= {DISCOUNT_MAX_PCT} % of the image, REJECT above)",
        "model": str(model_path.relative_to(REPO)) if model_path.is_relative_to(REPO) else str(model_path),
        "samples": rows,
    }
    (out_dir / "samples.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.make_demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=REPO / ".make" / "demo",
                        help="scratch folder for the generated data and the training run (replaced)")
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="override for quick checks (the demo uses "
                        f"{EPOCHS}; other values are recorded on the card)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout)
    try:
        run(args.work, args.epochs)
    except ExportError as exc:
        log.error("%s", exc)
        return 2
    return 0


_MARKER = ".export-make-demo"


def _fresh_work(work: Path) -> tuple[Path, Path]:
    """Empty ``work/data`` and ``work/run`` for a new run; refuses a non-empty folder this
    command did not create (it marks its own with a ``.export-make-demo`` file)."""
    if work.exists() and any(work.iterdir()) and not (work / _MARKER).is_file():
        raise ExportError(f"--work {work}: not empty and not made by {COMMAND}; choose an empty or new folder")
    work.mkdir(parents=True, exist_ok=True)
    (work / _MARKER).write_text(f"scratch folder of {COMMAND}; replaced on every run\n")
    data, run_dir = work / "data", work / "run"
    for d in (data, run_dir):
        if d.exists():
            shutil.rmtree(d)
    return data, run_dir


def run(work: Path, epochs: int = EPOCHS) -> ModelCard:
    """Steps 1–4 of the module docstring; returns the demo model's card."""
    from .train import TrainConfig, train

    t0 = time.perf_counter()
    data, run_dir = _fresh_work(work)
    write_dataset(data, COUNT, DATA_SEED, PLATE_SIZE)

    command = COMMAND if epochs == EPOCHS else f"{COMMAND} --epochs {epochs}"
    cfg = TrainConfig(
        data_dir=data,
        out_dir=run_dir,
        preprocess=tuple(preprocess_ops(PreprocessOptions())),
        groups=data / GROUPS_FILE,
        size=INPUT_SIZE,
        alpha=ALPHA,
        epochs=epochs,
        batch=BATCH,
        lr=LR,
        seed=TRAIN_SEED,
        val_fraction=0.2,
        name="demo-lgp-seg",
        version="1",
        description="Demo defect segmentation for light-guide plates (bright spots, impurities, scratches as one "
                    "'defect' class), trained on synthetic plates only: for trying station out, not for a line.",
        data_description=f"{COUNT} synthetic light-guide-plate images {PLATE_SIZE[0]}x{PLATE_SIZE[1]} from "
                         f"export.synth (seed {DATA_SEED}; bright spots, impurities, scratches, 20 % defect-free; "
                         "each plate photographed 1-3 times)",
        command=command,
    )
    result = train(cfg)

    size = result.onnx_path.stat().st_size
    if size > MAX_BYTES:
        raise ExportError(f"{result.onnx_path}: {size / 1e6:.1f} MB exceeds the {MAX_BYTES / 1e6:.0f} MB asset limit")
    ASSET.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(result.onnx_path, ASSET)
    CURVES.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / "curves.png", CURVES)
    write_samples(SAMPLES, ASSET)
    figures = result.card.training.figures
    log.info("demo model %s (%.2f MB): val IoU %.4f, train IoU %.4f, training %.0f s; parity %s; all done in %.0f s",
             ASSET.relative_to(REPO), size / 1e6, figures["val_iou"], figures["train_iou"], result.seconds,
             result.card.export.parity, time.perf_counter() - t0)
    return result.card


if __name__ == "__main__":
    from .alloc import reexec_under_jemalloc

    reexec_under_jemalloc()
    sys.exit(main())
