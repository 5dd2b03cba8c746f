"""The model card: the contract between ``export/`` (which writes it) and
``station`` (which reads it and refuses models that do not match it).

The card is JSON in the ONNX ``metadata_props`` under the key
``station.modelcard``. It names the input tensor, the preprocessing ops in
order, the output tensors and how to decode them, the training data and the
evaluation figures, and the toolchain that produced the file.
"""

from __future__ import annotations

import json
from typing import Annotated, Final, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

METADATA_KEY = "station.modelcard"
CARD_SCHEMA_VERSION: Final = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- preprocessing ops -------------------------------------------------------
# Implemented once in station/preprocess.py; export/ builds training inputs
# with the same functions.


class ColourOp(_Strict):
    """Convert the decoded frame (gray or BGR) to the model's colour space."""

    op: Literal["colour"] = "colour"
    to: Literal["gray", "rgb", "bgr"] = Field(description="target colour space")


class ClaheOp(_Strict):
    """Contrast-limited adaptive histogram equalisation (per channel)."""

    op: Literal["clahe"] = "clahe"
    clip_limit: float = Field(2.0, gt=0, description="OpenCV clipLimit")
    tile_grid: int = Field(8, ge=1, le=64, description="tiles per side")


class EqualizeHistOp(_Strict):
    """Global histogram equalisation (per channel)."""

    op: Literal["equalize_hist"] = "equalize_hist"


class DilateOp(_Strict):
    """Grey-level dilation with a square or elliptic structuring element."""

    op: Literal["dilate"] = "dilate"
    kernel: int = Field(3, ge=1, le=31, description="structuring element size, pixels")
    shape: Literal["rect", "ellipse"] = "rect"
    iterations: int = Field(1, ge=1, le=10)


class ResizeOp(_Strict):
    """Resize to the input tensor's height × width.

    stretch: both axes scaled independently. letterbox: aspect ratio kept, the
    rest padded (centred) and removed again when outputs are mapped back to the
    source frame. ``pad_mode`` fills the padding: constant (``pad_value``),
    replicate (the edge pixels repeated) or reflect (the image mirrored about its
    edge pixels, OpenCV's BORDER_REFLECT_101), so that a defect at the part's
    edge keeps surface beside it rather than a step to a flat grey.
    """

    op: Literal["resize"] = "resize"
    mode: Literal["stretch", "letterbox"] = "stretch"
    interpolation: Literal["area", "linear", "nearest"] = "area"
    pad_value: int = Field(0, ge=0, le=255)
    pad_mode: Literal["constant", "replicate", "reflect"] = "constant"


class NormalizeOp(_Strict):
    """uint8 → float32: ``(x * scale - mean) / std`` per channel."""

    op: Literal["normalize"] = "normalize"
    scale: float = Field(1.0 / 255.0, description="applied first")
    mean: list[float] = Field(default_factory=lambda: [0.0])
    std: list[float] = Field(default_factory=lambda: [1.0])

    @model_validator(mode="after")
    def _std_nonzero(self) -> "NormalizeOp":
        if any(s == 0 for s in self.std):
            raise ValueError("std must not contain 0")
        return self


PreprocessOp = Annotated[
    Union[ColourOp, ClaheOp, EqualizeHistOp, DilateOp, ResizeOp, NormalizeOp],
    Field(discriminator="op"),
]


# --- tensors -----------------------------------------------------------------


class InputSpec(_Strict):
    name: str = Field(description="ONNX input name")
    layout: Literal["NHWC", "NCHW"] = "NHWC"
    height: int = Field(ge=8)
    width: int = Field(ge=8)
    channels: Literal[1, 3]
    dtype: Literal["float32", "uint8"] = "float32"
    colour: Literal["gray", "rgb", "bgr"]

    def shape(self, batch: int = 1) -> tuple[int, int, int, int]:
        if self.layout == "NHWC":
            return (batch, self.height, self.width, self.channels)
        return (batch, self.channels, self.height, self.width)


class MaskOutput(_Strict):
    """Per-pixel class probabilities at input resolution, one channel per class."""

    type: Literal["mask"] = "mask"
    name: str
    layout: Literal["NHWC", "NCHW"] = "NHWC"
    activation: Literal["none", "sigmoid"] = Field(
        "none", description="'none': values are probabilities; 'sigmoid': logits to squash"
    )
    threshold: float = Field(0.5, gt=0, lt=1, description="probability above which a pixel is defective")


class DetectionOutputs(_Strict):
    """Boxes after in-graph NMS (tf.image.combined_non_max_suppression layout).

    boxes: (1, K, 4) float, [y1, x1, y2, x2] normalised to the input tensor (0..1).
    scores: (1, K); classes: (1, K) class index as float or int; count: (1,) valid K.
    """

    type: Literal["detection"] = "detection"
    boxes: str
    scores: str
    classes: str
    count: str
    box_format: Literal["yxyx_normalized", "xyxy_normalized"] = "yxyx_normalized"
    score_threshold: float = Field(0.3, ge=0, lt=1)
    nms_iou: float = Field(0.5, gt=0, le=1, description="IoU used by the in-graph NMS (informational)")
    max_detections: int = Field(100, ge=1)


# --- provenance --------------------------------------------------------------


class TrainingInfo(_Strict):
    data: str = Field(description="where the training data came from")
    split: str = Field("", description="how train/validation were split")
    command: str = Field("", description="the command that reproduces the model")
    epochs: int = 0
    seed: int | None = None
    seconds: float | None = Field(None, description="wall-clock training time")
    figures: dict[str, float] = Field(default_factory=dict, description="validation figures (IoU, mAP…)")
    evaluated_by: str = Field("", description="the command that produced the figures")


class ExportInfo(_Strict):
    tensorflow: str
    tf2onnx: str
    onnx: str
    opset: int = Field(le=18)
    parity: dict[str, float] = Field(default_factory=dict, description="TF vs ONNX Runtime agreement")


class QuantizationInfo(_Strict):
    """How an INT8 copy was made from its float model (``python -m export.quantize``) and
    what it costs in accuracy. The rest of the card is the float model's."""

    source: str = Field(description="the float model: card name, version and file name")
    source_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the float model's file")
    method: str = Field(description="format, data types, granularity, toolchain")
    calibration: str = Field(description="calibration method and its settings")
    calibration_data: str = Field(description="the calibration images: folder, how they were chosen")
    calibration_images: int = Field(ge=1)
    kept_float: str = Field("", description="the nodes left in float, and why")
    evaluation: str = Field(description="the held-out images the figures were measured on, and how")
    figures: dict[str, float] = Field(
        default_factory=dict, description="station eval figures: fp32_*, int8_* and delta_* (INT8 minus float)")
    command: str = Field(description="the command that reproduces this file from the float model")


class ModelCard(_Strict):
    schema_version: Literal[1] = CARD_SCHEMA_VERSION
    name: str
    version: str
    task: Literal["segmentation", "detection"]
    classes: list[str] = Field(min_length=1)
    description: str = ""
    input: InputSpec
    preprocess: list[PreprocessOp]
    output: Union[MaskOutput, DetectionOutputs] = Field(discriminator="type")
    training: TrainingInfo
    export: ExportInfo
    quantization: QuantizationInfo | None = Field(None, description="set on an INT8 copy of a float model")

    @model_validator(mode="after")
    def _consistent(self) -> "ModelCard":
        ops = [op.op for op in self.preprocess]
        if ops.count("colour") != 1 or ops[0] != "colour":
            raise ValueError("preprocess must start with exactly one 'colour' op")
        colour = self.preprocess[0]
        assert isinstance(colour, ColourOp)  # ops[0] == "colour", and the "op" discriminator made that a ColourOp
        if colour.to != self.input.colour:
            raise ValueError(f"colour op converts to {colour.to!r} but input.colour is {self.input.colour!r}")
        want_channels = 1 if self.input.colour == "gray" else 3
        if self.input.channels != want_channels:
            raise ValueError(f"input.colour {self.input.colour!r} needs {want_channels} channel(s), card says {self.input.channels}")
        if ops.count("resize") != 1:
            raise ValueError("preprocess must contain exactly one 'resize' op")
        if ops.count("normalize") > 1:
            raise ValueError("preprocess may contain one 'normalize' op at most")
        if self.input.dtype == "float32" and (not ops or ops[-1] != "normalize"):
            raise ValueError("a float32 input needs 'normalize' as the last preprocess op")
        if self.input.dtype == "uint8" and "normalize" in ops:
            raise ValueError("a uint8 input cannot have a 'normalize' op")
        for op in self.preprocess:
            if isinstance(op, NormalizeOp):
                for name, vals in (("mean", op.mean), ("std", op.std)):
                    if len(vals) not in (1, self.input.channels):
                        raise ValueError(f"normalize.{name} has {len(vals)} values for {self.input.channels} channel(s)")
        if self.task == "segmentation" and not isinstance(self.output, MaskOutput):
            raise ValueError("a segmentation model needs a 'mask' output")
        if self.task == "detection" and not isinstance(self.output, DetectionOutputs):
            raise ValueError("a detection model needs 'detection' outputs")
        return self

    @property
    def resize(self) -> ResizeOp:
        return next(op for op in self.preprocess if isinstance(op, ResizeOp))

    def output_names(self) -> list[str]:
        out = self.output
        if isinstance(out, MaskOutput):
            return [out.name]
        return [out.boxes, out.scores, out.classes, out.count]

    def to_json(self) -> str:
        return self.model_dump_json(indent=None)

    @classmethod
    def from_json(cls, text: str) -> "ModelCard":
        return cls.model_validate(json.loads(text))
