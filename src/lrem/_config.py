"""Loading a config dataclass from defaults, a YAML file and flags, with checked keys and types."""
from __future__ import annotations

import types
import typing
from dataclasses import fields
from pathlib import Path


def load_config(cls, path=None, overrides: dict | None = None):
    """Defaults, then a YAML file of values, then `overrides` (None values are ignored).

    An unknown key, a value of the wrong type or malformed YAML raises a ValueError naming the
    file (and line) or "flag", and the key.
    """
    import yaml

    overrides = overrides or {}
    values: dict = {}
    if path is not None:
        try:
            values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise ValueError(f"{where}: malformed YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of config keys to values")
    values.update({k: v for k, v in overrides.items() if v is not None})
    hints, known = typing.get_type_hints(cls), {f.name for f in fields(cls)}
    for key, value in values.items():
        src = "flag" if key in overrides else path
        if key not in known:
            raise ValueError(f"{src}: unknown key {key!r}; known: {', '.join(sorted(known))}")
        if not type_ok(value, hints[key]):
            want = getattr(hints[key], "__name__", None) if not isinstance(hints[key], types.UnionType) else None
            raise ValueError(f"{src}: key {key!r}: expected {want or hints[key]}, got {value!r}")
    return cls(**values)


def type_ok(value, hint) -> bool:
    """Whether a YAML/flag value fits a field's annotation (int is accepted for float)."""
    for t in typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,):
        if t is type(None) and value is None:
            return True
        if typing.get_origin(t) is list and isinstance(value, list) and all(isinstance(v, str) for v in value):
            return True
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if t in (int, str, bool) and type(value) is t:
            return True
    return False
