"""The params reference, read from the schema (rlhf/core/config.py), where each key is described once:
`rlhf params [KEY]` prints it, docs/params.md is generated from it, and a rejected value's error line ends
with its key's description and allowed values."""

from __future__ import annotations

import json
from dataclasses import dataclass

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from rlhf.core.config import Config, allowed, is_section


@dataclass(frozen=True)
class Key:
    name: str  # dotted, e.g. train_rm.data
    allowed: str  # e.g. "last | concat | sample", "number > 0"
    default: str  # as YAML writes it; "(required)" for rounds
    description: str
    section: bool  # a section of keys rather than one value


def keys(model: type[BaseModel] = Config, prefix: str = "") -> list[Key]:
    """Every key of `model`, sections before the keys inside them, in the schema's order."""
    out = []
    for name, field in model.model_fields.items():
        sub = field.annotation if is_section(field) else None
        default = "(required)" if field.default is PydanticUndefined else "" if sub else _yaml(field.default)
        out.append(
            Key(prefix + name, "section" if sub else allowed(field), default, field.description or "", bool(sub))
        )
        if sub:
            out += keys(sub, f"{prefix}{name}.")
    return out


def line(k: Key) -> str:
    """One key in one line: description, allowed values, default."""
    return f"{k.description} ({k.allowed}" + (f"; default {k.default})" if k.default else ")")


def _yaml(value) -> str:
    if isinstance(value, BaseModel):
        return ""
    return (
        json.dumps(value, ensure_ascii=False)
        if not isinstance(value, (int, float)) or isinstance(value, bool)
        else repr(value)
    )


def markdown() -> str:
    """docs/params.md: one table per section, the section's docstring above it."""
    lines = [
        "# params.yaml reference",
        "",
        "Generated from the schema in `rlhf/core/config.py` by `rlhf params --markdown` (a test keeps it "
        "current). `rlhf params KEY` prints one key. Every key is optional except `rounds`.",
        "",
    ]
    everything = keys()
    for name, model in _sections().items():
        lines += [
            f"## `{name or 'top level'}`",
            "",
            " ".join((model.__doc__ or "").split()),
            "",
            "| key | allowed | default | what it does |",
            "|---|---|---|---|",
        ]
        for k in everything:
            if k.name.rpartition(".")[0] == name:
                default = f"`{k.default}`" if k.default else ""
                lines.append(f"| `{k.name}` | {_cell(k.allowed)} | {_cell(default)} | {_cell(k.description)} |")
        lines.append("")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "\\n")


def _sections(model: type[BaseModel] = Config, prefix: str = "") -> dict[str, type[BaseModel]]:
    out = {prefix.rstrip("."): model}
    for name, field in model.model_fields.items():
        if is_section(field):
            out |= _sections(field.annotation, f"{prefix}{name}.")
    return out
