"""Every config key with its type, default and documentation, for ``rlhf COMMAND --help``.

A key's documentation is the comment block right above its field in ``pipeline/config.py``
(a section's, its class docstring); a field a stage restates without a comment (a shared field
with another default) keeps the comment of the base class that declares it. It is read from
that module's source, so the dataclasses stay the one place a key is described.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import textwrap
import typing
from dataclasses import dataclass
from typing import Any

from pipeline import config as config_module
from pipeline.config import Config, _type_name, fields_in_order, to_dict

# The sections each command reads besides the shared model, data, tracking and run.
STAGE_SECTIONS = {"sft": ("sft",), "label": ("label",), "rm": ("rm",), "ppo": ("ppo",),
                  "dpo": ("dpo",), "eval": ("eval",)}
SHARED_SECTIONS = ("model", "data", "tracking", "run")


@dataclass
class Key:
    name: str
    type: str
    default: str
    doc: str


@functools.cache
def field_comments() -> dict[str, dict[str, str]]:
    """``{class name: {field: the comment block above it, joined into one paragraph}}``."""
    try:
        source = inspect.getsource(config_module)
    except OSError:  # installed without its .py sources: the keys are listed without docs
        return {}
    lines = source.splitlines()
    found: dict[str, dict[str, str]] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields = found.setdefault(node.name, {})
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            block = []
            i = stmt.lineno - 2  # the line above, 0-based
            while i >= 0 and lines[i].strip().startswith("#"):
                block.append(lines[i].strip().removeprefix("#").strip())
                i -= 1
            fields[stmt.target.id] = " ".join(reversed(block)).strip()
    return found


def field_doc(cls: type, name: str) -> str:
    """The comment above field ``name`` in ``cls``, else in the nearest base class with one."""
    docs = field_comments()
    return next((docs[k.__name__][name] for k in cls.__mro__
                 if docs.get(k.__name__, {}).get(name)), "")


def _show(value: Any) -> str:
    """A default as it would be written in YAML (JSON is valid YAML flow style)."""
    return json.dumps(value, default=to_dict, ensure_ascii=False)


def section_keys(cls: type, prefix: str, value: Any = None) -> list[Key]:
    """The keys of one section, nested sections flattened (``model.lora.r``); the fields of a
    list's items as ``ppo.rewards[].weight``."""
    value = cls() if value is None else value
    hints = typing.get_type_hints(cls)
    keys = []
    for f in fields_in_order(cls):
        tp, name, current = hints[f.name], f"{prefix}.{f.name}", getattr(value, f.name)
        if dataclasses.is_dataclass(tp):
            keys += section_keys(tp, name, current)
            continue
        keys.append(Key(name, _type_name(tp), _show(current), field_doc(cls, f.name)))
        if typing.get_origin(tp) is list:
            (item,) = typing.get_args(tp)
            if dataclasses.is_dataclass(item):
                keys += section_keys(item, f"{name}[]")
    return keys


def sections(command: str) -> list[str]:
    """The config sections ``command`` reads, its own first."""
    if command in STAGE_SECTIONS:
        return [*STAGE_SECTIONS[command], *SHARED_SECTIONS]
    if command == "report":
        return ["run"]
    every = [f.name for f in dataclasses.fields(Config)]
    if command == "scaling":
        return ["scaling", *(s for s in every if s != "scaling")]
    return every


def section_class(section: str) -> type:
    return typing.get_type_hints(Config)[section]


def section_summary(section: str) -> str:
    doc = inspect.getdoc(section_class(section)) or ""
    return doc.splitlines()[0] if doc else ""


def describe_keys(section_names: list[str], width: int = 100) -> str:
    """The help text for the keys of ``section_names``: one entry per key, its doc below."""
    out = []
    for section in section_names:
        out.append(f"{section}: {section_summary(section)}".rstrip(": "))
        for key in section_keys(section_class(section), section):
            out.append(f"  {key.name}: {key.type} = {key.default}")
            if key.doc:
                out += textwrap.wrap(key.doc, width, initial_indent=" " * 6,
                                     subsequent_indent=" " * 6)
        out.append("")
    return "\n".join(out).rstrip() + "\n"
