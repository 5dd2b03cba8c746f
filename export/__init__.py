"""Offline side of station: synthetic data, U-Net training and ONNX export.

Run the modules as ``python -m export.<module>`` from the repository root:

* ``export.synth``       synthetic light-guide-plate images with truth masks
* ``export.train``       train a MobileNetV2 U-Net and export it with its model card
* ``export.onnx_export`` (re)embed or show the model card of an ONNX file
* ``export.make_demo``   reproduce ``station/assets/demo_seg.onnx`` and ``samples/``

Library modules: ``card`` (model-card drafts, preprocessing flags → ops),
``data`` (image/mask pairs → arrays through ``station.preprocess``), ``unet``
(the Keras model). TensorFlow is imported only by ``unet``, by ``train`` and
``onnx_export`` when they train or convert, and by ``make_demo`` through them;
``synth``, ``data`` and ``card`` need numpy and OpenCV alone, like ``station``.
"""

from __future__ import annotations

from station.errors import StationError


class ExportError(StationError):
    """Training data, a training option or an exported model is unusable; the message names it."""
