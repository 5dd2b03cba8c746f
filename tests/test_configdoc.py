"""The configuration reference is generated from the config models: every key of every
section (and of every camera type) has its row, with its default."""

from __future__ import annotations

import re

from station.config import CameraConfig, RunConfig, StationConfig
from station.configdoc import render


def test_every_key_of_every_section_has_a_row():
    page = render()
    sections = dict(re.findall(r"^## `([^`]+)`\n(.*?)(?=^## |\Z)", page, re.S | re.M))
    for name in StationConfig.model_fields:
        assert any(s == name or s.startswith(f"{name} (type:") for s in sections), name
    for key in ("id",):
        assert f"| `{key}` |" in sections["station"]
    run = sections["run"]
    for name in RunConfig.model_fields:
        assert f"| `{name}` |" in run, name
    camera_types = [a.model_fields["type"].annotation.__args__[0] for a in CameraConfig.__args__[0].__args__]
    for t in camera_types:
        assert f"camera (type: {t})" in sections, t


def test_defaults_are_the_models_defaults():
    page = render()
    assert '| `id` | text | `"station-1"` |' in page
    assert re.search(r"\| `min_area_px` \| integer \| `16` \|", page)
