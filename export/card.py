"""Model-card drafts for the models ``export/`` trains (no TensorFlow needed).

A draft is a complete, valid :class:`station.modelcard.ModelCard`; training
fills in its figures and :mod:`export.onnx_export` its toolchain versions and
TF/ONNX parity before embedding it in the ONNX file.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from importlib import metadata
from typing import Literal, Sequence

from pydantic import ValidationError

from station.modelcard import (
    ClaheOp,
    ColourOp,
    DilateOp,
    EqualizeHistOp,
    ExportInfo,
    InputSpec,
    MaskOutput,
    ModelCard,
    NormalizeOp,
    PreprocessOp,
    ResizeOp,
    TrainingInfo,
)

from . import ExportError

DEFAULT_OPSET = 17
MAX_OPSET = 18  # the card schema's limit

# Mean/std after scaling to 0..1: 'unit' keeps 0..1, 'symmetric' maps to -1..1
# (MobileNetV2's own preprocessing, needed with ImageNet weights).
NORMALIZATIONS: dict[str, tuple[float, float]] = {"unit": (0.0, 1.0), "symmetric": (0.5, 0.5)}


@dataclass(frozen=True)
class PreprocessOptions:
    """The preprocessing chain in flag form; :func:`preprocess_ops` turns it into card ops.

    Order: colour → CLAHE or global histogram equalisation → dilation → resize → normalize.
    clahe: (clip limit, tiles per side) or None. dilate: kernel size in source
    pixels, 0 for none.
    """

    colour: Literal["gray", "rgb", "bgr"] = "gray"
    clahe: tuple[float, int] | None = (2.0, 8)
    equalize: bool = False
    dilate: int = 3
    dilate_shape: Literal["rect", "ellipse"] = "rect"
    resize_mode: Literal["stretch", "letterbox"] = "stretch"
    interpolation: Literal["area", "linear", "nearest"] = "area"
    pad_value: int = 0
    pad_mode: Literal["constant", "replicate", "reflect"] = "constant"
    normalize: Literal["unit", "symmetric"] = "symmetric"

    @property
    def channels(self) -> int:
        return 1 if self.colour == "gray" else 3


def _validation_message(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {e['msg']}" for e in exc.errors())


def preprocess_ops(opts: PreprocessOptions) -> list[PreprocessOp]:
    """The card's preprocess op list for ``opts`` (ExportError names the bad flag)."""
    if opts.clahe is not None and opts.equalize:
        raise ExportError("--clahe and --equalize are exclusive: choose one contrast op (or --no-clahe)")
    ops: list[PreprocessOp] = [ColourOp(to=opts.colour)]
    try:
        if opts.clahe is not None:
            ops.append(ClaheOp(clip_limit=opts.clahe[0], tile_grid=opts.clahe[1]))
        elif opts.equalize:
            ops.append(EqualizeHistOp())
    except ValidationError as exc:
        assert opts.clahe is not None  # only ClaheOp(...) validates anything here
        raise ExportError(f"--clahe {opts.clahe[0]:g},{opts.clahe[1]}: {_validation_message(exc)}") from exc
    try:
        if opts.dilate:
            ops.append(DilateOp(kernel=opts.dilate, shape=opts.dilate_shape))
    except ValidationError as exc:
        raise ExportError(f"--dilate {opts.dilate}: {_validation_message(exc)}") from exc
    try:
        ops.append(ResizeOp(mode=opts.resize_mode, interpolation=opts.interpolation, pad_value=opts.pad_value,
                            pad_mode=opts.pad_mode))
    except ValidationError as exc:
        raise ExportError(f"--resize-mode/--interpolation/--pad-value/--pad-mode: {_validation_message(exc)}") from exc
    mean, std = NORMALIZATIONS[opts.normalize]
    ops.append(NormalizeOp(scale=1.0 / 255.0, mean=[mean], std=[std]))
    return ops


def clahe_arg(text: str) -> tuple[float, int]:
    """argparse type of ``--clahe CLIP,GRID``."""
    try:
        clip, grid = text.split(",")
        return float(clip), int(grid)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected CLIP,GRID such as 2.0,8") from None


def package_version(name: str) -> str:
    """Installed version of a distribution, without importing it ('' if absent)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return ""


def draft_card(
    *,
    name: str,
    version: str,
    size: tuple[int, int],
    preprocess: Sequence[PreprocessOp],
    training: TrainingInfo,
    classes: Sequence[str] = ("defect",),
    threshold: float = 0.5,
    description: str = "",
    opset: int = DEFAULT_OPSET,
    input_name: str = "image",
    output_name: str = "mask",
) -> ModelCard:
    """A segmentation card: NHWC float32 input ``input_name`` of ``size`` (H, W), a
    sigmoid-probability NHWC mask output ``output_name`` with one channel per class."""
    if not 1 <= opset <= MAX_OPSET:
        raise ExportError(f"--opset {opset}: must be between 1 and {MAX_OPSET}")
    colour = preprocess[0].to if preprocess and isinstance(preprocess[0], ColourOp) else "gray"
    try:
        return ModelCard(
            name=name,
            version=version,
            task="segmentation",
            classes=list(classes),
            description=description,
            input=InputSpec(
                name=input_name,
                layout="NHWC",
                height=size[0],
                width=size[1],
                channels=1 if colour == "gray" else 3,
                dtype="float32",
                colour=colour,
            ),
            preprocess=list(preprocess),
            output=MaskOutput(name=output_name, layout="NHWC", activation="none", threshold=threshold),
            training=training,
            export=ExportInfo(
                tensorflow=package_version("tensorflow"),
                tf2onnx=package_version("tf2onnx"),
                onnx=package_version("onnx"),
                opset=opset,
            ),
        )
    except ValidationError as exc:
        raise ExportError(f"model card {name!r}: {_validation_message(exc)}") from exc


PIX2PIX_FILTERS: tuple[int, ...] = (512, 256, 128, 64)


def default_decoder_filters(alpha: float) -> tuple[int, ...]:
    """pix2pix's (512, 256, 128, 64) scaled by the encoder's width multiplier,
    rounded to multiples of 8 (alpha 0.35 → (176, 88, 48, 24))."""
    return tuple(max(8, int(round(f * alpha / 8.0)) * 8) for f in PIX2PIX_FILTERS)
