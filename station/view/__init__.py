"""The operator's live page (``operator_view`` in the config): a sink that serves
the latest parts, the shift's counts and defect heatmap, and the station's
health to a browser, live (station/view/live.py, station/view/server.py,
static/ the page itself: no file is fetched from anywhere else)."""

from .live import OperatorView

__all__ = ["OperatorView"]
