"""The configuration reference, generated from the config models (one source of truth).

``python -m station.configdoc > docs/configuration.md`` writes it: one table per
section, every key with its type, default and description as the models hold
them. ``make docs`` rewrites ``docs/configuration.md`` with it.
"""

from __future__ import annotations

import json
import sys
import types
import typing
from enum import Enum
from pathlib import Path
from typing import Any, Iterator, Literal, Union

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .config import StationConfig

HEADER = """# Configuration reference

Generated from the config models (`station/config.py`) by `python -m station.configdoc`;
do not edit by hand. YAML, strict: an unknown key is an error, and every error names the
file, the line and the field (`station check-config FILE`). Relative paths are relative to
the config file. An annotated example: [`config/station.yaml`](../config/station.yaml).

A config file is at most 1 MiB, 20,000 values with its YAML aliases expanded and 32
levels deep; anything beyond is refused at once (exit 2, file and line), and a `SIGHUP`
reload of such a file keeps the running config.
"""


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """``X | None`` → (X, True); anything else → (it, False)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else Union[tuple(rest)]), True
    return annotation, False


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The config models a field holds: itself, the variants of a union, a dict's or a list's values."""
    annotation, _ = _unwrap(annotation)
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        return [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
    if origin in (dict, list) and args and isinstance(args[-1], type) and issubclass(args[-1], BaseModel):
        return [args[-1]]
    return []


def _type_name(annotation: Any) -> str:
    annotation, optional = _unwrap(annotation)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        name = " | ".join(f"`{a}`" for a in args)
    elif origin is typing.Annotated:
        name = _type_name(args[0])
    elif origin in (list, tuple):
        name = f"list of {_type_name(args[0])}" if args else "list"
    elif origin is dict:
        name = f"map of {_type_name(args[-1])}"
    elif origin in (Union, types.UnionType):
        name = " or ".join(_type_name(a) for a in args)
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        name = "section"
    elif isinstance(annotation, type) and issubclass(annotation, Enum):
        name = " | ".join(f"`{m.value}`" for m in annotation)
    elif isinstance(annotation, type):
        name = {"Path": "path", "str": "text", "int": "integer", "float": "number", "bool": "true/false"}.get(
            annotation.__name__, annotation.__name__)
    else:
        name = str(annotation)
    return f"{name} or null" if optional else name


def _default(field: Any) -> str:
    value = field.default
    if value is PydanticUndefined:
        if field.default_factory is None:
            return "required"
        value = field.default_factory()
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, list) and value and isinstance(value[0], BaseModel):
        value = [v.model_dump(mode="json") for v in value]
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, Path):
        value = str(value)
    return f"`{json.dumps(value, ensure_ascii=False, default=str)}`"


def _cell(text: str) -> str:
    return " ".join(text.replace("|", "\\|").split())


def _section(model: type[BaseModel], prefix: str, description: str = "") -> Iterator[str]:
    """Markdown for ``model`` at ``prefix``: a heading, its text, its table, then its sub-sections."""
    doc = description or (model.__doc__ or "").strip()
    yield f"\n## `{prefix}`\n"
    if doc:
        yield " ".join(doc.split()).replace("``", "`") + "\n"
    yield "| key | type | default | meaning |\n|---|---|---|---|"
    nested: list[tuple[type[BaseModel], str]] = []
    for name, field in model.model_fields.items():
        models = _models_in(field.annotation)
        origin = typing.get_origin(_unwrap(field.annotation)[0])
        key = f"{name}.<name>" if origin is dict and models else (f"{name}[]" if origin is list and models else name)
        yield f"| `{key}` | {_cell(_type_name(field.annotation))} | {_cell(_default(field))} | " \
              f"{_cell(field.description or '')} |"
        nested += [(sub, f"{prefix}.{key}{_variant(sub, models)}") for sub in models]
    for sub, sub_prefix in nested:
        yield from _section(sub, sub_prefix)


def _variant(model: type[BaseModel], models: list[type[BaseModel]]) -> str:
    """`` (type: folder)`` for one variant of a tagged union, else nothing."""
    tag = model.model_fields.get("type")
    return f" (type: {typing.get_args(tag.annotation)[0]})" if tag is not None and len(models) > 1 else ""


def render() -> str:
    """The whole reference page."""
    parts = [HEADER]
    for name, field in StationConfig.model_fields.items():
        models = _models_in(field.annotation)
        for sub in models:
            what = field.description or ""
            text = f"{what[:1].upper()}{what[1:]}. {(sub.__doc__ or '').strip()}" if what else (sub.__doc__ or "")
            parts.extend(_section(sub, f"{name}{_variant(sub, models)}", text))
    return "\n".join(parts).replace("\n\n\n", "\n\n") + "\n"


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
