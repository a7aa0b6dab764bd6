"""Loading a config dataclass from defaults, a YAML file and flags, with checked keys and types."""
from __future__ import annotations

import math
import re
import types
import typing
from dataclasses import fields
from pathlib import Path


def load_config(cls, path=None, overrides: dict | None = None, sources: dict[str, str] | None = None):
    """Defaults, then a YAML file of values, then `overrides` (None values are ignored), each
    override's source named by `sources` (a key's "--set key=..."), else "flag".

    An unknown key, a value of the wrong type, a number that is not finite (NaN, infinity: no lrem
    setting takes one), malformed YAML, a file that is not UTF-8 text, or a value the class's own
    checks (`__post_init__`) refuse raises a ValueError naming where the value came from (the
    file, or "flag") and the key.
    """
    values, source = _read_yaml(path) if path is not None else ({}, {})
    given = {k: v for k, v in (overrides or {}).items() if v is not None}  # a flag left unset is no source
    values.update(given)
    source.update({k: (sources or {}).get(k, "flag") for k in given})
    hints, known = typing.get_type_hints(cls), {f.name for f in fields(cls)}
    for key, value in values.items():
        src = source[key]
        if key not in known:
            raise ValueError(f"{src}: unknown key {key!r}; known: {', '.join(sorted(known))}")
        values[key] = value = float_text(value, hints[key])
        if not type_ok(value, hints[key]):
            want = getattr(hints[key], "__name__", None) if not isinstance(hints[key], types.UnionType) else None
            raise ValueError(f"{src}: key {key!r}: expected {want or hints[key]}, got {value!r}")
        if not finite(value):
            shown = f"an integer of {len(str(value))} digits" if isinstance(value, int) else repr(value)
            raise ValueError(f"{src}: key {key!r}: {shown} is not a finite number")
    try:
        return cls(**values)
    except ValueError as e:  # the class's own range checks: say which source the keys they name came from
        named = [k for k in values if re.search(rf"\b{re.escape(k)}\b", str(e))] or list(values)
        where = ", ".join(dict.fromkeys(source[k] for k in named)) or cls.__name__
        raise ValueError(f"{where}: {e}") from None


def _read_yaml(path) -> tuple[dict, dict]:
    """(the file's mapping of keys to values, each key's source: the file)."""
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:  # its own message names no file
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}); "
                         "a config is a YAML text file") from None
    try:
        values = yaml.safe_load(text) or {}
    except yaml.reader.ReaderError as e:  # a character YAML does not allow (a control character): its line
        line = text[:e.position].count("\n") + 1
        raise ValueError(f"{path}:{line}: malformed YAML (character {e.character:#x} is not allowed)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ValueError(f"{where}: malformed YAML ({getattr(e, 'problem', None) or e})") from None
    except ValueError as e:  # a value the constructor cannot make (an int of over 4300 digits)
        raise ValueError(f"{path}: malformed YAML ({e})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of config keys to values")
    return values, dict.fromkeys(values, str(path))


def finite(value) -> bool:
    """False for a number that is NaN, infinite or beyond a float's range (an int of 400 digits),
    which no lrem setting takes (max_grad_norm: 0 is off, not inf; router_share: 1 reasons on
    every query); True for anything else, non-numbers included.

    >>> finite(0.5), finite(float("nan")), finite(float("-inf")), finite(10**400), finite("x")
    (True, False, False, False, True)
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return True
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def check_finite(config) -> None:
    """Refuse a config dataclass whose numeric field is not `finite` (for direct construction:
    `load_config` names the file or flag first); called first in `__post_init__`, so a NaN never
    reaches the range checks, which it would pass (every comparison with NaN is False)."""
    for f in fields(config):
        value = getattr(config, f.name)
        if not finite(value):
            raise ValueError(f"{f.name}={value!r}; need a finite number")


# what YAML 1.1 (PyYAML) leaves a string although it is a number: `1e-5` (1.1 wants `1.0e-5`)
EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def float_text(value, hint):
    """`value` as a float where the field takes one and the value is a number YAML read as text
    (`learning_rate: 1e-5`); else `value` as it is.

    >>> float_text("1e-5", float), float_text("1e-5", str), float_text("x", float)
    (1e-05, '1e-5', 'x')
    """
    takes = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if float in takes and str not in takes and isinstance(value, str) and EXPONENT.fullmatch(value.strip()):
        return float(value)
    return value


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
