"""Small hand-built ONNX models with cards, for tests that need a model without
TensorFlow. (The trained models come from export/ and are tested in
test_export.py and test_replay.py.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from station.modelcard import METADATA_KEY, ModelCard


def threshold_card(size: int = 64, **overrides) -> ModelCard:
    """A card for the 'bright pixels are defects' model below."""
    card = {
        "name": "bright-threshold",
        "version": "0",
        "task": "segmentation",
        "classes": ["defect"],
        "input": {"name": "image", "layout": "NHWC", "height": size, "width": size, "channels": 1, "dtype": "float32", "colour": "gray"},
        "preprocess": [
            {"op": "colour", "to": "gray"},
            {"op": "resize", "mode": "letterbox", "interpolation": "area"},
            {"op": "normalize", "scale": 1 / 255, "mean": [0.0], "std": [1.0]},
        ],
        "output": {"type": "mask", "name": "mask", "threshold": 0.5},
        "training": {"data": "none: a fixed threshold at 0.75 brightness"},
        "export": {"tensorflow": "n/a", "tf2onnx": "n/a", "onnx": onnx.__version__, "opset": 17},
    }
    for key, value in overrides.items():
        card[key] = value
    return ModelCard.model_validate(card)


def write_threshold_model(path: Path, card: ModelCard | None = None, card_json: str | None = None,
                          input_name: str = "image", output_name: str = "mask", size: int = 64,
                          channels: int = 1) -> Path:
    """mask = sigmoid(40 * (x - 0.75)): pixels brighter than 0.75 are 'defects'."""
    x = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [1, size, size, channels])
    y = helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [1, size, size, 1])
    nodes = [
        helper.make_node("Sub", [input_name, "t"], ["d"]),
        helper.make_node("Mul", ["d", "k"], ["z"]),
        helper.make_node("Sigmoid", ["z"], ["s"]),
        helper.make_node("ReduceMax", ["s"], [output_name], axes=[3], keepdims=1),
    ]
    inits = [
        helper.make_tensor("t", TensorProto.FLOAT, [], [0.75]),
        helper.make_tensor("k", TensorProto.FLOAT, [], [40.0]),
    ]
    graph = helper.make_graph(nodes, "threshold", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    text = card_json if card_json is not None else (card or threshold_card(size)).to_json()
    if text:
        helper.set_model_props(model, {METADATA_KEY: text})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def write_detection_model(path: Path, boxes: list[list[float]], scores: list[float], classes: list[int],
                          class_names: list[str], size: int = 64) -> Path:
    """A detector that returns fixed boxes (yxyx, normalised) whatever the image:
    exercises the card's detection contract and the postprocessing."""
    k = len(boxes)
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, size, size, 1])
    outs = [
        helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, k, 4]),
        helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, k]),
        helper.make_tensor_value_info("classes", TensorProto.FLOAT, [1, k]),
        helper.make_tensor_value_info("count", TensorProto.INT32, [1]),
    ]
    # Each output = constant + 0 * mean(image), so the graph depends on its input.
    nodes = [helper.make_node("ReduceMean", ["image"], ["m"], keepdims=0), helper.make_node("Mul", ["m", "zero"], ["z"])]
    inits = [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])]
    consts = {
        "boxes": np.asarray(boxes, np.float32).reshape(1, k, 4),
        "scores": np.asarray(scores, np.float32).reshape(1, k),
        "classes": np.asarray(classes, np.float32).reshape(1, k),
    }
    for name, arr in consts.items():
        inits.append(helper.make_tensor(f"{name}_c", TensorProto.FLOAT, arr.shape, arr.ravel().tolist()))
        nodes.append(helper.make_node("Add", [f"{name}_c", "z"], [name]))
    inits.append(helper.make_tensor("count", TensorProto.INT32, [1], [k]))
    graph = helper.make_graph(nodes, "fixed_boxes", [x], outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    card = ModelCard.model_validate({
        "name": "fixed-boxes", "version": "0", "task": "detection", "classes": class_names,
        "input": {"name": "image", "height": size, "width": size, "channels": 1, "colour": "gray"},
        "preprocess": [{"op": "colour", "to": "gray"}, {"op": "resize"}, {"op": "normalize"}],
        "output": {"type": "detection", "boxes": "boxes", "scores": "scores", "classes": "classes", "count": "count",
                   "score_threshold": 0.3},
        "training": {"data": "none: fixed outputs"},
        "export": {"tensorflow": "n/a", "tf2onnx": "n/a", "onnx": onnx.__version__, "opset": 17},
    })
    helper.set_model_props(model, {METADATA_KEY: card.to_json()})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path
