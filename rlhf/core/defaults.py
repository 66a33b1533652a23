"""Every key optional, for real: the defaults of the keys params.yaml leaves out are written into it.

DVC checks a stage's params in the file itself: a stage that lists `prompts.too_long` refuses to run while
params.yaml lacks it, and a default that lived only in the code would be invisible to `dvc status` and
`dvc params diff`. So `rlhf run` and `rlhf stages` (before writing dvc.yaml) add each key the file leaves
out, at the schema's default, and say so in one line. The file stays the user's: it is edited in place,
comments, order and quoting kept (ruamel's round trip, as DVC's own `dvc exp run -S` edits it), each added
key placed where the schema has it. From then on DVC sees every value, defaults included, so a changed value
re-runs exactly the stages that list it, and a project written before a key existed gains it, at the value
that keeps its behaviour, the first time a newer version runs it.
"""

from __future__ import annotations

import math
from pathlib import Path

from pydantic import BaseModel

from rlhf.core.config import Config, is_section, parse_config, read_yaml


def missing(raw: dict, cfg: Config) -> list[tuple[tuple[str, ...], object]]:
    """(path, default) of each key the raw params leave out: a section left out whole is one entry."""
    return list(_missing(raw, Config, cfg.model_dump(mode="json"), ()))


def _missing(raw: dict, model: type[BaseModel], values: dict, where: tuple[str, ...]):
    for name, field in model.model_fields.items():
        if field.is_required():
            continue
        if name not in raw:
            yield (*where, name), values[name]
        elif is_section(field) and isinstance(raw[name], dict):  # a prompt set given as a bare path is whole
            yield from _missing(raw[name], field.annotation, values[name], (*where, name))


def with_defaults(raw: dict) -> dict:
    """The raw params with every key they leave out added at its default (a new dict)."""
    import copy

    out = copy.deepcopy(raw)
    for path, value in missing(raw, parse_config(raw, "params")):
        section = out
        for part in path[:-1]:
            section = section[part]
        section[path[-1]] = value
    return out


def complete(path: str | Path = "params.yaml") -> list[str]:
    """Write into params.yaml, in place, each key it leaves out, at its default; returns their dotted names."""
    import io

    from ruamel.yaml import YAML

    from rlhf.core.io import write_text

    path = Path(path)
    cfg = parse_config(read_yaml(path), path)  # a mistake is named before anything is written
    yaml = YAML()  # round trip: comments, order and quoting as the user wrote them
    yaml.preserve_quotes = True
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 120
    yaml.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    yaml.representer.add_representer(float, _float)
    doc = yaml.load(path.read_text(encoding="utf-8"))
    added = missing(doc, cfg)
    for key, value in added:
        section = doc
        for part in key[:-1]:
            section = section[part]
        at = _position(section, key)
        section.insert(at, key[-1], _flow_lists(value))
        if at == len(section) - 1 and at:  # appended: the blank lines that ended the section end it again
            _move_blank_lines(*_deepest(section, list(section)[at - 1]), section, key[-1])
        if len(key) == 1 and isinstance(value, dict):  # a whole section: a blank line before and after it
            for k in list(doc)[max(at - 1, 0) : min(at + 1, len(doc) - 1)]:  # not after the file's last
                _blank_line_after(*_deepest(doc, k))
    if added:
        out = io.StringIO()
        yaml.dump(doc, out)
        write_text(path, out.getvalue())
    return [".".join(key) for key, _ in added]


def _float(representer, value: float):
    """A float as YAML 1.1 readers (PyYAML, DVC's params) read it back as a float: 5e-05 is a string to them,
    5.0e-05 is not."""
    if not math.isfinite(value):
        return representer.represent_float(value)
    text = repr(value)
    if "e" in text and "." not in text:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}.0e{exponent}"
    return representer.represent_scalar("tag:yaml.org,2002:float", text)


def notice(added: list[str], path: str | Path = "params.yaml") -> str:
    """The one line saying what `complete` wrote."""
    shown = ", ".join(added[:6]) + (f" and {len(added) - 6} more" if len(added) > 6 else "")
    return f"{path}: wrote {len(added)} keys it left out at their defaults, so that DVC tracks them: {shown}"


def _position(section, key: tuple[str, ...]) -> int:
    """Where the schema puts key[-1] among the keys `section` has: after the last one the schema puts before it."""
    model = Config
    for part in key[:-1]:
        model = model.model_fields[part].annotation
    order = list(model.model_fields)
    before = order[: order.index(key[-1])]
    present = list(section)
    return max((present.index(k) + 1 for k in before if k in present), default=0)


# ruamel keeps the blank lines after a value in that value's end-of-line comment; after a nested section, in its
# deepest last value's.


def _deepest(holder, key: str):
    """The mapping and key holding the comment that ends `holder[key]`."""
    while isinstance(holder[key], dict) and holder[key]:
        holder, key = holder[key], list(holder[key])[-1]
    return holder, key


def _comment(text: str):
    from ruamel.yaml.error import CommentMark
    from ruamel.yaml.tokens import CommentToken

    return [None, None, CommentToken(text, CommentMark(0), None), None]


def _move_blank_lines(holder, key: str, section, added: str) -> None:
    """The blank lines after holder[key] go after the key `added` to `section` after it."""
    token = holder.ca.items.get(key, [None] * 3)[2]
    if token is None or not token.value.endswith("\n\n"):
        return
    text = token.value.rstrip("\n")
    section.ca.items[added] = _comment("\n" * (len(token.value) - len(text)))
    if text:
        token.value = text + "\n"
    else:
        del holder.ca.items[key]


def _blank_line_after(holder, key: str) -> None:
    token = holder.ca.items.get(key, [None] * 3)[2]
    if token is None:
        holder.ca.items[key] = _comment("\n\n")
    elif not token.value.endswith("\n\n"):
        token.value += "\n"


def _flow_lists(value):
    """A list of plain values written on one line (`[0.5, 0.7]`), as params.yaml writes them; mappings recursed."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    if isinstance(value, dict):
        out = CommentedMap()
        for k, v in value.items():
            out[k] = _flow_lists(v)
        if not value:
            out.fa.set_flow_style()
        return out
    if isinstance(value, list) and not any(isinstance(v, dict | list) for v in value):
        seq = CommentedSeq(value)
        seq.fa.set_flow_style()
        return seq
    return value
