"""U-Net with a MobileNetV2 encoder (Keras 3), after the TensorFlow pix2pix
segmentation tutorial.

Encoder: ``keras.applications.MobileNetV2(include_top=False)``; skips at
strides 2, 4, 8, 16 from ``block_1/3/6/13_expand_relu`` and the bottleneck at
stride 32 from ``block_16_project``. Decoder: four pix2pix upsample blocks
(Conv2DTranspose 3×3 stride 2 → BatchNorm → optional Dropout → ReLU), each
followed by concatenation with the skip of the same stride, and a last
Conv2DTranspose stride 2 to ``num_classes`` channels with a sigmoid.

Input ``image``: (N, H, W, C) float32, H and W multiples of 32 (or None: any
such size at run time), C 1 or 3.
Output ``mask``: (N, H, W, num_classes) float32 probabilities (NHWC).

:func:`multiscale` wraps such a network (built with H = W = None) into one
of a fixed input size that also runs it on the input shrunk by whole factors
(area averaging), scales each result back up (bilinear) and keeps the
pixel-wise maximum: a defect larger than the encoder's view at full scale
fits it at half scale, a small one is still seen at full scale.

Every BatchNormalization (encoder included) uses momentum 0.9 rather than
MobileNetV2's 0.999, whose moving statistics would still be near their
initial values after a short training and make inference disagree with
training.

Pretrained weights come only from a local file (``weights=PATH``, nothing is
downloaded). Such files are for 3-channel input; with a 1-channel input the
gray plane is repeated to three channels inside the model (the model's input
stays 1-channel) so the pretrained first convolution applies unchanged.
ImageNet weights expect inputs in [-1, 1] (``--normalize symmetric``).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import keras
from keras import layers

from . import ExportError
from .card import PIX2PIX_FILTERS, default_decoder_filters  # noqa: F401  (re-exported: the decoder's widths)

log = logging.getLogger(__name__)

SKIP_LAYERS: tuple[str, ...] = (
    "block_1_expand_relu",  # stride 2
    "block_3_expand_relu",  # stride 4
    "block_6_expand_relu",  # stride 8
    "block_13_expand_relu",  # stride 16
    "block_16_project",  # stride 32 (bottleneck)
)
INPUT_NAME = "image"
OUTPUT_NAME = "mask"


def upsample(filters: int, dropout: float, name: str, momentum: float) -> keras.Sequential:
    """pix2pix upsample block: (N, h, w, c) → (N, 2h, 2w, filters)."""
    block = [
        layers.Conv2DTranspose(filters, 3, strides=2, padding="same", use_bias=False,
                               kernel_initializer=keras.initializers.RandomNormal(0.0, 0.02)),
        layers.BatchNormalization(momentum=momentum),
    ]
    if dropout > 0:
        block.append(layers.Dropout(dropout))
    block.append(layers.ReLU())
    return keras.Sequential(block, name=name)


def _walk(layer: keras.layers.Layer) -> Iterator[keras.layers.Layer]:
    """Every layer inside ``layer`` (models and Sequential blocks are entered)."""
    for sub in getattr(layer, "layers", ()):
        yield sub
        yield from _walk(sub)


def set_bn_momentum(model: keras.Model, momentum: float) -> int:
    """Set ``momentum`` on every BatchNormalization, nested models included; return how many."""
    count = 0
    for layer in _walk(model):
        if isinstance(layer, layers.BatchNormalization):
            layer.momentum = float(momentum)
            count += 1
    return count


def build_unet(
    input_shape: tuple[int | None, int | None, int],
    num_classes: int = 1,
    alpha: float = 0.35,
    weights: str | Path | None = None,
    decoder_filters: Sequence[int] | None = None,
    dropout: float = 0.0,
    bn_momentum: float = 0.9,
    name: str = "unet_mobilenetv2",
) -> keras.Model:
    """Build the U-Net (see the module docstring).

    input_shape: (H, W, C), H and W multiples of 32 (both None: any size), C 1 or 3. alpha: MobileNetV2
    width multiplier (0.35, 0.5, 0.75, 1.0, 1.3, 1.4). weights: None (random) or
    a local MobileNetV2 ``include_top=False`` weights file of the same alpha.
    decoder_filters: four values, deepest first (default: scaled with alpha).
    """
    h, w, c = input_shape
    if (h is None) != (w is None):
        raise ExportError(f"--size {h} {w}: both or neither of height and width may be left open")
    if h is not None and w is not None and (h % 32 or w % 32 or h < 32 or w < 32):  # both, as just checked
        raise ExportError(f"--size {h} {w}: height and width must be multiples of 32 (MobileNetV2 has stride 32)")
    if c not in (1, 3):
        raise ExportError(f"input channels {c}: must be 1 (gray) or 3 (colour)")
    filters = tuple(decoder_filters) if decoder_filters is not None else default_decoder_filters(alpha)
    if len(filters) != len(SKIP_LAYERS) - 1 or any(f < 1 for f in filters):
        raise ExportError(f"decoder filters {filters}: need {len(SKIP_LAYERS) - 1} positive values")
    if weights is not None:
        weights = Path(weights)
        if not weights.is_file():
            raise ExportError(f"--weights {weights}: no such file")

    base, encoder_channels, errors = None, c, []
    # A weights file of the input's channels (an encoder pretrained on gray images)
    # loads as it is; a 3-channel one (ImageNet) gets the
    # gray input repeated to 3 channels.
    for encoder_channels in ((c, 3) if weights is not None and c != 3 else (c,)):
        try:
            with warnings.catch_warnings():  # Keras 3 warns of every nested container of a weights-only file
                warnings.filterwarnings("ignore", message="Skipping nested container")
                base = keras.applications.MobileNetV2(
                    input_shape=(h, w, encoder_channels),
                    alpha=alpha,
                    include_top=False,
                    weights=str(weights) if weights is not None else None,
                )
            break
        except (ValueError, OSError) as exc:  # a weights file of another alpha/shape, or not HDF5
            errors.append(f"input {h}x{w}x{encoder_channels}: {exc}")
    if base is None:
        raise ExportError(f"--weights {weights}: cannot load into MobileNetV2(alpha={alpha:g}): " + "; ".join(errors))
    encoder = keras.Model(base.input, [base.get_layer(n).output for n in SKIP_LAYERS], name="encoder")

    inputs = keras.Input((h, w, c), name=INPUT_NAME)
    x = inputs
    if c != encoder_channels:
        log.info("1-channel input with 3-channel pretrained weights %s: gray repeated to 3 channels", weights)
        x = layers.Concatenate(axis=-1, name="gray_to_3")([x, x, x])
    *skips, x = encoder(x)
    for i, (f, skip) in enumerate(zip(filters, reversed(skips))):
        x = upsample(f, dropout, f"up{i + 1}", bn_momentum)(x)
        x = layers.Concatenate(name=f"skip{i + 1}")([x, skip])
    outputs = layers.Conv2DTranspose(num_classes, 3, strides=2, padding="same", activation="sigmoid",
                                     name=OUTPUT_NAME)(x)
    model = keras.Model(inputs, outputs, name=name)
    n_bn = set_bn_momentum(model, bn_momentum)
    log.debug("U-Net %s: %d parameters, %d BatchNorm layers at momentum %g", input_shape, model.count_params(),
              n_bn, bn_momentum)
    return model


def multiscale(core: keras.Model, size: tuple[int, int], factors: Sequence[int], name: str) -> keras.Model:
    """``core`` (a :func:`build_unet` network of open height and width) at full scale
    and at 1/k of ``size`` for each k of ``factors``: the input averaged over k×k
    blocks, the mask scaled back up by k (bilinear), the pixel-wise maximum of all
    scales. The model's weights are ``core``'s (shared, same order)."""
    h, w = size
    factors = tuple(int(k) for k in factors)
    bad = [k for k in factors if k < 2 or h % (32 * k) or w % (32 * k)]
    if bad:
        raise ExportError(f"--multiscale {' '.join(map(str, factors))}: each factor must be an integer >= 2 that "
                          f"leaves the input {h}x{w} a multiple of 32 (bad: {bad})")
    channels = core.input.shape[-1]
    inputs = keras.Input((h, w, channels), name=INPUT_NAME)
    masks = [core(inputs)]
    for k in factors:
        small = layers.AveragePooling2D(k, name=f"shrink{k}")(inputs)
        masks.append(layers.UpSampling2D(k, interpolation="bilinear", name=f"grow{k}")(core(small)))
    outputs = layers.Maximum(name=OUTPUT_NAME)(masks) if factors else masks[0]
    return keras.Model(inputs, outputs, name=name)
