"""An anchor-free (FCOS-style) box detector on MobileNetV2 features (Keras 3).

Backbone: ``keras.applications.MobileNetV2(weights=None)`` (trained from
scratch; a local weights file may be given, never downloaded). Neck: a small
FPN — 1×1 lateral convolutions of the stride-8/16/32 features
(``block_6_expand_relu``, ``block_13_expand_relu``, ``out_relu``) to ``width``
channels, summed top-down (nearest upsampling). The head reads the levels
named by ``strides``: (8,) (one stride-8 map, the default) or several of 8,
16, 32, as in FCOS. Head: two towers of ``head_depth`` separable 3×3 conv →
BN → ReLU, one for classification (``C`` sigmoid logits, bias at prior 0.01)
and one for the box (4 distances to the left/top/right/bottom sides,
``stride · exp(t)``) and quality (one logit: centre-ness, or IoU); the convolutions are shared
by the levels, each level has its own BatchNorm statistics.

Training output (``build_detector``): ``(N, cells, C + 5)`` raw
[class logits | ltrb log-distances | quality logit], the cells of every
level row by row, finest level first (:func:`cell_grid`).

Targets (:func:`encode_targets`, numpy): a cell whose centre lies inside a box
is positive for that box when the largest of its four distances to the box's
sides falls in its level's range (:func:`size_ranges`: up to 64 px at stride
8, 64–128 px at 16, beyond at 32; one level takes every size) and, with
centre sampling (``centre_radius``), the cell lies within that many strides of
the box's centre; the smallest box wins where several qualify, and a box left
without a cell takes the finest level's cell nearest its centre.
Loss (:func:`make_loss`): sigmoid focal loss (α 0.25, γ 2) over all cells,
GIoU on positive cells weighted by the centre-ness target, BCE on the
quality logit of positive cells; the first two normalised by the number of
positives, as in FCOS. The quality logit learns the cell's centre-ness
(FCOS) or, with ``quality="iou"``, the IoU of its predicted box with the
truth (IoU-aware detectors: the score then favours the better-placed box,
which matters for mAP at IoU 0.75 and above).

Inference (``build_inference``): boxes ``(x − l, y − t, x + r, y + b)``,
score = √(σ(class) · σ(quality logit)), then ``tf.image.combined_non_max_suppression``
(hard NMS per class, ``clip_boxes``) in the graph. Outputs, the card's
:class:`station.modelcard.DetectionOutputs` layout: ``boxes`` (1, K, 4)
[y1, x1, y2, x2] normalised to the input tensor, ``scores`` (1, K),
``classes`` (1, K) float, ``count`` (1,) int32.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Sequence

import keras
import numpy as np
from keras import layers

from . import ExportError
from .detector_options import LEVEL_STRIDES, QUALITY_TARGETS, check_strides, check_tta
from .unet import set_bn_momentum

log = logging.getLogger(__name__)

STRIDE = 8  # the finest level
STRIDES: tuple[int, ...] = (STRIDE,)  # the default head: one stride-8 map
FEATURE_LAYERS: tuple[str, ...] = ("block_6_expand_relu", "block_13_expand_relu", "out_relu")  # strides 8, 16, 32
INPUT_NAME = "image"
OUTPUT_NAMES: tuple[str, ...] = ("boxes", "scores", "classes", "count")
MAX_LOG_DISTANCE = 8.0  # exp(8) · 8 px ≫ any input side: keeps exp() finite early in training


# --- model -------------------------------------------------------------------


def build_detector(
    input_shape: tuple[int, int, int],
    num_classes: int,
    alpha: float = 0.5,
    width: int = 96,
    head_depth: int = 2,
    weights: str | Path | None = None,
    bn_momentum: float = 0.9,
    name: str = "fcos_mobilenetv2",
    strides: Sequence[int] = STRIDES,
) -> keras.Model:
    """The training model: (N, H, W, C) → (N, cells, num_classes + 5) raw head outputs.

    input_shape: (H, W, C), H and W multiples of 32, C 1 or 3. alpha: MobileNetV2
    width multiplier. width: FPN and head channels. weights: None (random) or a
    local MobileNetV2 ``include_top=False`` weights file (3-channel; a gray input
    is repeated to three channels inside the model). strides: the FPN levels
    the head reads (:func:`check_strides`).
    """
    strides = check_strides(strides)
    h, w, c = input_shape
    if h % 32 or w % 32 or h < 32 or w < 32:
        raise ExportError(f"--size {h} {w}: height and width must be multiples of 32 (MobileNetV2 has stride 32)")
    if c not in (1, 3):
        raise ExportError(f"input channels {c}: must be 1 (gray) or 3 (colour)")
    encoder_channels = 3 if weights is not None else c
    try:
        base = keras.applications.MobileNetV2(input_shape=(h, w, encoder_channels), alpha=alpha, include_top=False,
                                              weights=str(weights) if weights is not None else None)
    except (ValueError, OSError) as exc:
        raise ExportError(f"--weights {weights}: cannot load into MobileNetV2(alpha={alpha:g}): {exc}") from exc
    backbone = keras.Model(base.input, [base.get_layer(n).output for n in FEATURE_LAYERS], name="backbone")

    inputs = keras.Input((h, w, c), name=INPUT_NAME)
    x = inputs
    if c != encoder_channels:
        x = layers.Concatenate(axis=-1, name="gray_to_3")([x, x, x])
    c3, c4, c5 = backbone(x)
    p = layers.Conv2D(width, 1, name="lat5")(c5)
    tops = {32: p}
    for lvl, feat, stride in ((4, c4, 16), (3, c3, 8)):
        p = layers.UpSampling2D(2, interpolation="nearest", name=f"up{lvl}")(p)
        p = layers.Add(name=f"p{lvl}")([p, layers.Conv2D(width, 1, name=f"lat{lvl}")(feat)])
        tops[stride] = p

    # Layers with random initial weights are made in the order of the one-level
    # model (stride 8's first), so that a seed gives that model the same weights
    # as before the other levels existed; the other levels' layers come after.
    def conv(name: str):
        return layers.SeparableConv2D(width, 3, padding="same", use_bias=False, name=name)

    smooth = {STRIDE: conv("p3_smooth")}
    towers = {t: [conv(f"{t}_conv{i + 1}") for i in range(head_depth)] for t in ("cls", "box")}
    prior = -float(np.log((1 - 0.01) / 0.01))
    cls_out = layers.Conv2D(num_classes, 3, padding="same", name="cls_logits",
                            bias_initializer=keras.initializers.Constant(prior))
    ltrb_out = layers.Conv2D(4, 3, padding="same", name="ltrb",
                             kernel_initializer=keras.initializers.RandomNormal(0.0, 0.01))
    ctr_out = layers.Conv2D(1, 3, padding="same", name="centerness")
    for stride in strides[1:]:
        smooth[stride] = conv(f"p{LEVEL_STRIDES.index(stride) + 3}_smooth")

    def bn_relu(y, name: str, suffix: str):
        y = layers.BatchNormalization(momentum=bn_momentum, name=f"{name}_bn{suffix}")(y)
        return layers.ReLU(name=f"{name}_relu{suffix}")(y)

    heads = []
    for stride in strides:
        tag = "" if stride == STRIDE else f"_s{stride}"  # stride 8 keeps the one-level model's names
        lvl = LEVEL_STRIDES.index(stride) + 3
        y = layers.BatchNormalization(momentum=bn_momentum, name=f"p{lvl}_bn")(smooth[stride](tops[stride]))
        y = layers.ReLU(name=f"p{lvl}_relu")(y)
        outs = {}
        for t in ("cls", "box"):
            z = y
            for i, layer in enumerate(towers[t]):
                z = bn_relu(layer(z), t, f"{i + 1}{tag}")
            outs[t] = z
        head = layers.Concatenate(axis=-1, name=f"head{tag}")(
            [cls_out(outs["cls"]), ltrb_out(outs["box"]), ctr_out(outs["box"])])
        heads.append(layers.Reshape((-1, num_classes + 5), name=f"cells{tag}")(head))
    out = heads[0] if len(heads) == 1 else layers.Concatenate(axis=1, name="cells_all")(heads)
    model = keras.Model(inputs, out, name=name)
    set_bn_momentum(model, bn_momentum)
    return model


def grid_centres(in_h: int, in_w: int, stride: int = STRIDE) -> tuple[np.ndarray, np.ndarray]:
    """Cell centres of the stride grid in input pixels: (cx (h, w), cy (h, w)) float32."""
    gy, gx = np.mgrid[0 : in_h // stride, 0 : in_w // stride].astype(np.float32)
    return (gx + 0.5) * stride, (gy + 0.5) * stride


def cell_grid(in_h: int, in_w: int, strides: Sequence[int] = STRIDES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The cells of every level in the order of the model's output (finest level
    first, row by row): centres x, y and the level's stride, each (cells,) float32."""
    cx, cy, st = [], [], []
    for stride in strides:
        x, y = grid_centres(in_h, in_w, stride)
        cx.append(x.ravel())
        cy.append(y.ravel())
        st.append(np.full(x.size, stride, np.float32))
    return np.concatenate(cx), np.concatenate(cy), np.concatenate(st)


def size_ranges(strides: Sequence[int] = STRIDES) -> list[tuple[float, float]]:
    """Per level, the range (lo, hi] of a positive cell's largest distance to its box's
    sides, px: FCOS's boundaries at 8 × the finer level's stride (64 px between
    strides 8 and 16, 128 between 16 and 32); the finest level starts at 0, the
    coarsest has no end, so one level takes every box."""
    bounds = [0.0] + [8.0 * s for s in strides[:-1]] + [math.inf]
    return [(bounds[i], bounds[i + 1]) for i in range(len(strides))]


class DecodeNms(layers.Layer):
    """Raw head (N, h, w, C + 5) → combined-NMS outputs (see the module docstring)."""

    def __init__(self, in_h: int, in_w: int, num_classes: int, score_threshold: float, iou_threshold: float,
                 max_per_class: int, max_total: int, strides: Sequence[int] = STRIDES, **kwargs) -> None:
        super().__init__(**kwargs)
        self.in_h, self.in_w, self.num_classes = in_h, in_w, num_classes
        self.score_threshold, self.iou_threshold = float(score_threshold), float(iou_threshold)
        self.max_per_class, self.max_total = int(max_per_class), int(max_total)
        cx, cy, stride = cell_grid(in_h, in_w, strides)
        self._cx, self._cy, self._stride = cx[None], cy[None], stride[None, :, None]

    def call(self, raw):
        import tensorflow as tf

        c = self.num_classes
        n = tf.shape(raw)[0]
        flat = tf.reshape(raw, [n, -1, c + 5])
        prob = tf.sigmoid(flat[..., :c]) * tf.sigmoid(flat[..., c + 4 : c + 5])
        scores = tf.sqrt(prob)
        dist = tf.exp(tf.minimum(flat[..., c : c + 4], MAX_LOG_DISTANCE)) * tf.constant(self._stride)
        cx, cy = tf.constant(self._cx), tf.constant(self._cy)
        y1 = (cy - dist[..., 1]) / self.in_h
        x1 = (cx - dist[..., 0]) / self.in_w
        y2 = (cy + dist[..., 3]) / self.in_h
        x2 = (cx + dist[..., 2]) / self.in_w
        boxes = tf.stack([y1, x1, y2, x2], axis=-1)[:, :, None, :]
        nmsed = tf.image.combined_non_max_suppression(
            boxes, scores, max_output_size_per_class=self.max_per_class, max_total_size=self.max_total,
            iou_threshold=self.iou_threshold, score_threshold=self.score_threshold, pad_per_class=False,
            clip_boxes=True)
        return [nmsed.nmsed_boxes, nmsed.nmsed_scores, nmsed.nmsed_classes,
                tf.cast(nmsed.valid_detections, tf.int32)]

    def compute_output_spec(self, raw):
        n = raw.shape[0]
        k = self.max_total
        return [keras.KerasTensor((n, k, 4), "float32"), keras.KerasTensor((n, k), "float32"),
                keras.KerasTensor((n, k), "float32"), keras.KerasTensor((n,), "int32")]


FLIPS: dict[str, tuple[int, ...]] = {"h": (2,), "v": (1,), "hv": (1, 2)}  # test-time flips → NHWC axes reversed


class FlipImage(layers.Layer):
    """An NHWC batch mirrored left-right ("h"), top-bottom ("v") or both ("hv")."""

    def __init__(self, flip: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.flip = flip

    def call(self, x):
        import tensorflow as tf

        return tf.reverse(x, axis=list(FLIPS[self.flip]))


class UnflipCells(layers.Layer):
    """Raw head outputs (N, cells, C + 5) of a mirrored input → those of the input itself:
    each level's grid mirrored back, and the side distances swapped (left ↔ right for a
    left-right flip, top ↔ bottom for a top-bottom one)."""

    def __init__(self, in_h: int, in_w: int, num_classes: int, strides: Sequence[int], flip: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.grids = [(in_h // s, in_w // s) for s in strides]
        self.flip, self.num_classes = flip, num_classes
        c = num_classes
        order = list(range(c + 5))
        if "h" in flip:
            order[c], order[c + 2] = c + 2, c
        if "v" in flip:
            order[c + 1], order[c + 3] = c + 3, c + 1
        self.order = order

    def call(self, raw):
        import tensorflow as tf

        k = self.num_classes + 5
        parts = tf.split(raw, [gh * gw for gh, gw in self.grids], axis=1)
        back = [tf.reshape(tf.reverse(tf.reshape(part, [-1, gh, gw, k]), axis=list(FLIPS[self.flip])), [-1, gh * gw, k])
                for part, (gh, gw) in zip(parts, self.grids)]
        out = back[0] if len(back) == 1 else tf.concat(back, axis=1)
        return tf.gather(out, self.order, axis=-1)


def build_inference(model: keras.Model, num_classes: int, score_threshold: float = 0.05, iou_threshold: float = 0.5,
                    max_per_class: int = 50, max_total: int = 100, strides: Sequence[int] = STRIDES,
                    tta: Sequence[str] = ()) -> keras.Model:
    """``model`` (sharing its weights; built with these ``strides``) followed by decoding
    and in-graph NMS; outputs in the order of :data:`OUTPUT_NAMES`.

    tta: test-time flips ("h", "v", "hv"): the model also runs on each mirrored copy of
    the input, its raw outputs are mirrored back (:class:`UnflipCells`) and all are
    averaged — class and centre-ness logits, log side distances — before one decoding
    and NMS. The model was trained on all 8 symmetries of the square, so each copy is
    an image of its training distribution; the cost is one more model run per flip."""
    h, w = model.input.shape[1:3]
    cells = cell_grid(h, w, strides)[0].size
    if model.output.shape[1] != cells:
        raise ExportError(f"the model has {model.output.shape[1]} cells, levels {tuple(strides)} at {h}x{w} have {cells}")
    inputs = keras.Input(model.input.shape[1:], name=INPUT_NAME)
    raw = model(inputs, training=False)
    if tta:
        runs = [raw] + [UnflipCells(h, w, num_classes, strides, f, name=f"unflip_{f}")(
            model(FlipImage(f, name=f"flip_{f}")(inputs), training=False)) for f in check_tta(tta)]
        raw = layers.Average(name="tta_mean")(runs)
    outs = DecodeNms(h, w, num_classes, score_threshold, iou_threshold, max_per_class, max_total, strides,
                     name="decode_nms")(raw)
    return keras.Model(inputs, outs, name=model.name + "_nms")


# --- targets and loss --------------------------------------------------------


def encode_targets(boxes: np.ndarray, labels: np.ndarray, in_h: int, in_w: int, num_classes: int,
                   strides: Sequence[int] = STRIDES, centre_radius: float | None = None) -> np.ndarray:
    """One image's boxes → (cells, C + 6) float32 targets, cells as :func:`cell_grid`.

    boxes: (n, 4) [x1, y1, x2, y2] input pixels; labels: (n,) class index.
    centre_radius: FCOS centre sampling — a cell is positive only within ``centre_radius``
    × its level's stride of the box centre (both axes, clipped to the box), so that the
    cells near a box's edges, whose predictions are poor, are not taught it; None: every
    cell inside the box.
    Channels: one-hot class (C) | assigned box x1 y1 x2 y2 (4) | centre-ness
    target (1) | positive flag (1). Negative cells are all zero.
    """
    cx, cy, stride = cell_grid(in_h, in_w, strides)
    out = np.zeros((cx.size, num_classes + 6), np.float32)
    if len(boxes) == 0:
        return out
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    left = cx[:, None] - b[:, 0]
    top = cy[:, None] - b[:, 1]
    right = b[:, 2] - cx[:, None]
    bottom = b[:, 3] - cy[:, None]
    inside = np.minimum(np.minimum(left, right), np.minimum(top, bottom)) > 0  # (cells, n)
    reach = np.maximum(np.maximum(left, right), np.maximum(top, bottom))
    lo = np.empty(cx.size, np.float32)
    hi = np.empty(cx.size, np.float32)
    for s_, (a, z) in zip(strides, size_ranges(strides)):
        lo[stride == s_], hi[stride == s_] = a, z
    ok = inside & (reach > lo[:, None]) & (reach <= hi[:, None])
    mx, my = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2  # box centres
    if centre_radius is not None:
        r = centre_radius * stride[:, None]
        ok &= (np.abs(cx[:, None] - mx) < r) & (np.abs(cy[:, None] - my) < r)
    finest = int(np.count_nonzero(stride == strides[0]))
    gw = in_w // strides[0]
    for k in range(len(b)):  # a box left without a cell takes the finest level's cell nearest its centre
        if not ok[:, k].any():
            i = int(np.clip(my[k] // strides[0], 0, in_h // strides[0] - 1))
            j = int(np.clip(mx[k] // strides[0], 0, gw - 1))
            ok[min(i * gw + j, finest - 1), k] = True
    cost = np.where(ok, area[None, :], np.inf)
    best = np.argmin(cost, axis=-1)
    (cells,) = np.nonzero(np.isfinite(np.min(cost, axis=-1)))
    kk = best[cells]
    out[cells, labels[kk]] = 1.0
    out[cells, num_classes : num_classes + 4] = b[kk]
    l_, t_, r_, b_ = (np.maximum(v[cells, kk], 1e-3) for v in (left, top, right, bottom))
    ctr = np.sqrt((np.minimum(l_, r_) / np.maximum(l_, r_)) * (np.minimum(t_, b_) / np.maximum(t_, b_)))
    out[cells, num_classes + 4] = ctr
    out[cells, num_classes + 5] = 1.0
    return out


def make_loss(num_classes: int, in_h: int, in_w: int, alpha: float = 0.25, gamma: float = 2.0,
              box_weight: float = 1.0, strides: Sequence[int] = STRIDES, quality: str = "centreness"):
    """FCOS loss on (N, cells, C + 6) targets and (N, cells, C + 5) raw outputs (see the module docstring).

    quality: what the quality logit (the last channel) learns on positive cells — ``"centreness"``
    (FCOS: the cell's geometric centre-ness in its box) or ``"iou"`` (IoU-aware: the IoU of the
    cell's predicted box with its truth box, gradient stopped), so that the score ranks the
    better-placed of overlapping boxes first.
    """
    if quality not in QUALITY_TARGETS:
        raise ExportError(f"quality {quality!r}: choose one of {', '.join(QUALITY_TARGETS)}")
    ops = keras.ops
    c = num_classes
    cx, cy, cell_stride = cell_grid(in_h, in_w, strides)

    class FcosLoss(keras.losses.Loss):
        def __init__(self) -> None:
            super().__init__(name="fcos", reduction="sum_over_batch_size")

        def call(self, y_true, y_pred):
            y_true = ops.cast(y_true, y_pred.dtype)
            pos = y_true[..., c + 5]
            npos = ops.maximum(ops.sum(pos), 1.0)
            # focal loss
            t = y_true[..., :c]
            logits = y_pred[..., :c]
            p = ops.sigmoid(logits)
            ce = ops.maximum(logits, 0.0) - logits * t + ops.log1p(ops.exp(-ops.abs(logits)))
            p_t = p * t + (1 - p) * (1 - t)
            a_t = alpha * t + (1 - alpha) * (1 - t)
            focal = ops.sum(a_t * ops.power(1 - p_t, gamma) * ce) / npos
            # GIoU on positives, weighted by the centre-ness target
            dist = ops.exp(ops.minimum(y_pred[..., c : c + 4], MAX_LOG_DISTANCE)) * ops.convert_to_tensor(
                cell_stride[:, None])
            gx = ops.convert_to_tensor(cx)
            gy = ops.convert_to_tensor(cy)
            px1, py1 = gx - dist[..., 0], gy - dist[..., 1]
            px2, py2 = gx + dist[..., 2], gy + dist[..., 3]
            tx1, ty1, tx2, ty2 = (y_true[..., c + i] for i in range(4))
            iw = ops.maximum(ops.minimum(px2, tx2) - ops.maximum(px1, tx1), 0.0)
            ih = ops.maximum(ops.minimum(py2, ty2) - ops.maximum(py1, ty1), 0.0)
            inter = iw * ih
            union = (px2 - px1) * (py2 - py1) + (tx2 - tx1) * (ty2 - ty1) - inter
            iou = inter / ops.maximum(union, 1e-6)
            enc = (ops.maximum(px2, tx2) - ops.minimum(px1, tx1)) * (ops.maximum(py2, ty2) - ops.minimum(py1, ty1))
            giou = iou - (enc - union) / ops.maximum(enc, 1e-6)
            w_ctr = y_true[..., c + 4] * pos
            box = ops.sum(w_ctr * (1.0 - giou)) / ops.maximum(ops.sum(w_ctr), 1e-6)
            # quality BCE on positives (centre-ness or predicted-box IoU target)
            z = y_pred[..., c + 4]
            ct = y_true[..., c + 4] if quality == "centreness" else ops.stop_gradient(ops.clip(iou, 0.0, 1.0) * pos)
            bce = ops.maximum(z, 0.0) - z * ct + ops.log1p(ops.exp(-ops.abs(z)))
            centre = ops.sum(bce * pos) / npos
            # Keras divides by the batch size ("sum_over_batch_size" of a scalar is the scalar).
            return focal + box_weight * box + centre

    return FcosLoss()


def describe(model: keras.Model) -> str:
    return f"{model.name}: {model.count_params():,} parameters, input {tuple(model.input.shape[1:])}"
