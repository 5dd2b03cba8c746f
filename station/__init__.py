"""station: an edge visual-inspection daemon.

Frames → preprocess (as named in the model card) → ONNX Runtime → defects →
PASS / DISCOUNT / REJECT → results (JSONL, MQTT).
"""

import os

__version__ = "0.1.0"

# Decoding a 2,000 px frame needs 12 MB. Refuse what no line camera produces
# before OpenCV allocates it: OpenCV reads this limit when it is imported, so
# it is set before any station module imports cv2.
MAX_PIXELS = 100_000_000
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_PIXELS))

# ONNX Runtime's official Linux builds (1.29 on) report usage to Microsoft: a
# device id and an event cache under ~/.cache/Microsoft, then uploads to
# mobile.events.data.microsoft.com from the daemon. A line's station does not
# call out of the plant: telemetry is off unless the environment says otherwise
# (ORT_DISABLE_TELEMETRY=0). ONNX Runtime reads it once, when it is first imported.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
