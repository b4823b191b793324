"""A params file as a plain mapping, and validation errors as one line naming the key path.

kdpipe.config turns the mapping into typed sections; everything about the file itself (missing, not YAML, not a
mapping) and about wording an error is here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kdpipe.errors import UserError


class ConfigError(UserError):
    """Bad params: the message is one line that names the key path."""


def read(path: str | Path) -> dict:
    """The params file at `path` as a mapping of sections; ConfigError naming the file otherwise."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a mapping of sections, got {type(raw).__name__}")
    return raw


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
