"""A params file as a plain mapping, and validation errors as one line naming the key path.

kdpipe.config turns the mapping into typed sections; everything about the file itself (missing, a folder, not
text, not YAML, a key given twice, empty, not a mapping) and about wording an error is here. `kdpipe
check-params` and every stage read params through `read`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kdpipe.errors import UserError


class ConfigError(UserError):
    """Bad params: the message is one line that names the key path."""


def read(path: str | Path) -> dict:
    """The params file at `path` as a non-empty mapping of sections; ConfigError naming the file otherwise (missing,
    a folder, unreadable, not UTF-8 text, not YAML, a key given twice, empty, not a mapping)."""
    path = Path(path)
    raw = parse(path, _text(path))
    if raw is None or raw == {}:
        raise ConfigError(f"{path}: is empty; it must be a mapping of sections (seed, data, teacher, ...)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a mapping of sections, got {type(raw).__name__}")
    return raw


def _text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a params file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror or e})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file (byte {data[e.start]:#04x} at offset {e.start} is not "
                          f"UTF-8); a params file is YAML text") from None


def parse(path: Path, text: str) -> Any:
    """YAML `text` (from `path`, named in errors) as Python values, read by _StrictLoader."""
    loader = None
    try:
        loader = _StrictLoader(text)  # its reader refuses control characters (NUL, ...) here already
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_duplicates(path, node)
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        problem = " ".join(str(getattr(e, "problem", None) or getattr(e, "reason", None) or e).split())
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    finally:
        if loader is not None:
            loader.dispose()


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that also reads 1e-3 as a number, as YAML 1.2 and DVC's parser do (PyYAML's YAML 1.1 reads
    a float without a dot as a string, which strict params would then refuse)."""


_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                                    list("-+0123456789"))


def _refuse_duplicates(path: Path, node: yaml.Node, keys: tuple[str, ...] = (), seen: set | None = None) -> None:
    """ConfigError naming a key given twice in one mapping, with both lines (PyYAML would keep the last silently)."""
    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias met again: checked already (and a recursive one would never end)
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[tuple, int] = {}
        for key_node, value_node in node.value:
            key, line = (key_node.tag, str(key_node.value)), key_node.start_mark.line + 1
            if key in lines:
                raise ConfigError(f"{path}: {'.'.join([*keys, key[1]])} is given twice (lines {lines[key]} and "
                                  f"{line}); keep one")
            lines[key] = line
            _refuse_duplicates(path, value_node, (*keys, key[1]), seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicates(path, item, (*keys, str(i)), seen)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """A nested mapping flattened to dotted keys ({"teacher": {"lr": 1}} → {"teacher.lr": 1})."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def first_error(e: ValidationError) -> str:
    """One line for the first error: the dotted key path, then what was wrong and what was given."""
    err = e.errors(include_url=False)[0]
    loc = [str(p) for p in err["loc"]]
    msg = err["msg"]
    if err["type"] == "value_error":
        # Our cross-field validators prefix their message with the offending key.
        msg = msg.removeprefix("Value error, ")
        key, _, rest = msg.partition(": ")
        return f"{'.'.join([*loc, key])}: {rest}"
    return f"{'.'.join(loc) or '<root>'}: {_describe(err)}"


def _num(value: Any) -> str:
    """0.0 → 0, 5e-4 → 0.0005: numbers as a person would write them in params.yaml."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value)


def _describe(err: dict) -> str:
    ctx, given = err.get("ctx", {}), err.get("input")
    kind = err["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required"
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        limit = next(iter(ctx.values()))
        return f"must be {bounds[kind]} {_num(limit)}, got {_num(given)}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}, got {given!r}"
    return f"{err['msg'][0].lower()}{err['msg'][1:]}, got {json.dumps(given, default=str)}"
