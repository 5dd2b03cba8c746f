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
