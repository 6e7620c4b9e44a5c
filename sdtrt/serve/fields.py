"""Typed reads of JSON fields: a wrong type is a 422 naming the field, never a 500. A field that is
absent or null takes its default (as A1111's API treats optional fields)."""

from __future__ import annotations

import math
from typing import Any

from .errors import bad_type, invalid

MISSING = object()


def _get(body: dict, name: str, default: Any) -> tuple[bool, Any]:
    v = body.get(name)
    if v is None:
        if default is MISSING:
            raise invalid(name, f"{name} is required.", f"send {name}")
        return False, default
    return True, v


def integer(body: dict, name: str, default: Any = MISSING, low: int | None = None) -> Any:
    given, v = _get(body, name, default)
    if not given:
        return v
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool):
        raise bad_type(name, v, "an integer")
    if low is not None and v < low:
        raise invalid(name, f"{name}={v} is below {low}.", f"send {name} >= {low}")
    return v


def number(body: dict, name: str, default: Any = MISSING) -> Any:
    given, v = _get(body, name, default)
    if not given:
        return v
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise bad_type(name, v, "a finite number")
    return float(v)


def text(body: dict, name: str, default: Any = MISSING) -> Any:
    given, v = _get(body, name, default)
    if given and not isinstance(v, str):
        raise bad_type(name, v, "a string")
    return v


def flag(body: dict, name: str, default: bool = False) -> bool:
    given, v = _get(body, name, default)
    if not given:
        return v
    if isinstance(v, int) and not isinstance(v, bool) and v in (0, 1):
        return bool(v)  # A1111 clients send 0/1 for some flags
    if not isinstance(v, bool):
        raise bad_type(name, v, "true or false")
    return v
