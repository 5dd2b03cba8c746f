"""Config fuzzing (hypothesis): a shipped example config with one invalid
change at a random place — a value of the wrong type, an unknown key, a number
out of its range (bounds read from the config's JSON Schema) — must make
`station check-config --no-models` exit 2 with an error line
``FILE:LINE: dotted.field: message`` naming that place.
"""

from __future__ import annotations

import contextlib
import copy
import io
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from station.cli import main  # noqa: E402
from station.config import StationConfig  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = [ROOT / "config" / n for n in ("station.yaml", "camera-fake.yaml", "camera-folder.yaml",
                                          "camera-opencv.yaml", "camera-video.yaml")]
BASES = [yaml.safe_load(p.read_text()) for p in EXAMPLES]
SCHEMA = StationConfig.model_json_schema()
ERROR_LINE = re.compile(r"^(?:station: error: )?(?P<file>.+?):(?P<line>\d+): (?P<field>[^:]+): (?P<msg>.+)$")


# --- walking data and schema together -----------------------------------------------------


def paths(node: Any, prefix: tuple = ()) -> list[tuple[tuple, Any]]:
    """Every (path, value) below a mapping, keys only (lists are leaves)."""
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            out.append((prefix + (k,), v))
            out.extend(paths(v, prefix + (k,)))
    return out


def _resolve(schema: dict) -> dict:
    while "$ref" in schema:
        schema = SCHEMA["$defs"][schema["$ref"].split("/")[-1]]
    return schema


def _branches(schema: dict) -> list[dict]:
    schema = _resolve(schema)
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return [b for s in schema[key] for b in _branches(s)]
    return [schema]


def schema_at(data: dict, path: tuple) -> dict | None:
    """The schema of the value at ``path`` (the object branch chosen by the data)."""
    schema: dict = SCHEMA
    node: Any = data
    for key in path:
        objects = [b for b in _branches(schema) if b.get("type") == "object" or "properties" in b]
        if isinstance(node, dict) and "type" in node and len(objects) > 1:  # a tagged union: pick by tag
            objects = [b for b in objects if b.get("properties", {}).get("type", {}).get("const") == node["type"]]
        if not objects:
            return None
        obj = objects[0]
        if key in obj.get("properties", {}):
            schema = obj["properties"][key]
        elif isinstance(obj.get("additionalProperties"), dict):
            schema = obj["additionalProperties"]
        else:
            return None
        node = node.get(key) if isinstance(node, dict) else None
    return schema


def closed(data: dict, path: tuple) -> bool:
    """Whether the mapping at ``path`` has a fixed set of keys (a section, not a
    name-keyed table such as ``grading.classes``, where a new key is a new entry)."""
    schema = schema_at(data, path) if path else SCHEMA
    objects = [b for b in _branches(schema)] if schema is not None else []
    objects = [b for b in objects if b.get("type") == "object" or "properties" in b]
    return bool(objects) and not any(isinstance(b.get("additionalProperties"), dict) for b in objects)


def out_of_range(schema: dict) -> list[Any]:
    """Values just outside the numeric bounds of a number/integer schema."""
    values = []
    for b in _branches(schema):
        if b.get("type") not in ("number", "integer"):
            continue
        step = 1 if b["type"] == "integer" else 0.5
        if "minimum" in b:
            values.append(b["minimum"] - step)
        if "exclusiveMinimum" in b:
            values.append(b["exclusiveMinimum"])
        if "maximum" in b:
            values.append(b["maximum"] + step)
        if "exclusiveMaximum" in b:
            values.append(b["exclusiveMaximum"])
    return values


def set_at(data: dict, path: tuple, value: Any) -> None:
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def line_of(text: str, path: tuple) -> int:
    """1-based line of the key at ``path`` in YAML ``text``."""
    return lines_of(text, path)[0]


def lines_of(text: str, path: tuple) -> range:
    """1-based lines from the key at ``path`` to the end of its value (an error in
    an element of a list or mapping value is reported at the element's line)."""
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    first = last = 1
    for key in path:
        for k, v in node.value:
            if k.value == key:
                first, node = k.start_mark.line + 1, v
                last = max(first, v.end_mark.line + (1 if v.end_mark.column else 0))
                break
        else:
            raise KeyError(path)
    return range(first, last + 1)


# --- mutations -----------------------------------------------------------------------------


@st.composite
def mutated(draw) -> tuple[dict, tuple, str]:
    """(config data, the path of the invalid field, the kind of change)."""
    data = copy.deepcopy(draw(st.sampled_from(BASES)))
    kind = draw(st.sampled_from(["wrong_type", "unknown_key", "out_of_range"]))
    if kind == "unknown_key":
        mappings = [()] + [p for p, v in paths(data) if isinstance(v, dict) and closed(data, p)]
        where = draw(st.sampled_from(mappings))
        key = draw(st.from_regex(r"\Azz_[a-z]{1,8}\Z"))
        node = data
        for k in where:
            node = node[k]
        node[key] = draw(st.sampled_from([1, "x", None, [1], {"a": 1}]))
        return data, where + (key,), kind
    if kind == "out_of_range":
        candidates = []
        for p, v in paths(data):
            schema = schema_at(data, p)
            if schema is not None and isinstance(v, (int, float, type(None))) and not isinstance(v, bool):
                candidates += [(p, bad) for bad in out_of_range(schema)]
        if candidates:
            path, bad = draw(st.sampled_from(candidates))
            set_at(data, path, bad)
            return data, path, kind
        kind = "wrong_type"
    path, value = draw(st.sampled_from(paths(data)))
    if isinstance(value, dict):
        bad: Any = draw(st.sampled_from(["not-a-section", 42, [1, 2]]))
    elif isinstance(value, list):
        bad = draw(st.sampled_from([{"a": 1}, "not-a-list"]))
    else:  # a scalar (or null): a list of mappings is never a valid scalar
        bad = draw(st.sampled_from([[{"a": 1}], {"nested": {"x": 1}}]))
    set_at(data, path, bad)
    return data, path, kind


def check_config(path: Path) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["check-config", "--no-models", str(path)])
    return code, err.getvalue()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_every_invalid_change_is_reported_with_file_line_and_field(case):
    data, path, kind = case
    with tempfile.TemporaryDirectory() as d:
        cfg = Path(d) / "station.yaml"
        text = yaml.safe_dump(data, sort_keys=False)
        cfg.write_text(text)
        code, err = check_config(cfg)
    assert code == 2, (kind, path, text)
    dotted = ".".join(map(str, path))
    want_line = line_of(text, path)
    errors = [m for m in map(ERROR_LINE.match, err.splitlines()) if m]
    assert errors and all(m["file"] == str(cfg) for m in errors), err
    # the changed field (or, for a tagged union's tag, the union) at its line
    ok = [m for m in errors
          if (m["field"] == dotted or m["field"].startswith(dotted + ".") or (path[-1] == "type" and m["field"] == ".".join(map(str, path[:-1]))))
          and (int(m["line"]) in lines_of(text, path) or int(m["line"]) == (line_of(text, path[:-1]) if len(path) > 1 else 1))]
    assert ok, (kind, dotted, want_line, err)
    if kind == "unknown_key":  # only ever added to sections with a fixed set of keys
        assert any(m["msg"] == "unknown key" and int(m["line"]) == want_line for m in ok), err


def test_several_errors_are_all_reported_by_the_cli(tmp_path):
    """Through the real command line: every error on its own line, in file order."""
    cfg = tmp_path / "station.yaml"
    cfg.write_text("station:\n  id: cam1\n  colour: red\ncamera:\n  type: fake\n  fps: -3\n"
                   "run:\n  queue_size: many\nmqtt:\n  host: h\n  port: 70000\n")
    run = subprocess.run([sys.executable, "-m", "station", "check-config", "--no-models", str(cfg)],
                         capture_output=True, text=True)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert lines[0].startswith(f"station: error: {cfg}:3: station.colour: unknown key")
    assert any(line.startswith(f"{cfg}:6: camera.fps: Input should be greater than 0") for line in lines), lines
    assert any(line.startswith(f"{cfg}:8: run.queue_size: Input should be a valid integer") for line in lines), lines
    assert any(line.startswith(f"{cfg}:11: mqtt.port: Input should be less than or equal to 65535") for line in lines), lines
