"""Parsing of the ``ARGS`` in a ``--defense NAME:ARGS`` spec; every error names the expected form."""

from __future__ import annotations

import math


def split_args(args: str, form: str, *, least: int, most: int) -> list[str]:
    """Split comma-separated ``args`` into ``least``..``most`` fields, or raise ``ValueError``."""
    if not args and least > 0:
        raise ValueError(f"missing arguments: expected {form}")
    fields = [a.strip() for a in args.split(",")] if args else []
    if not least <= len(fields) <= most or any(not f for f in fields):
        raise ValueError(f"bad arguments {args!r}: expected {form}")
    return fields


def parse_int(text: str, form: str, *, minimum: int) -> int:
    """``text`` as an integer ``>= minimum``, or ``ValueError`` naming ``form``."""
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"bad argument {text!r}: expected {form}") from None
    if value < minimum:
        raise ValueError(f"bad argument {text!r}: expected {form}")
    return value


def parse_positive_float(text: str, form: str) -> float:
    """``text`` as a finite float ``> 0``, or ``ValueError`` naming ``form``."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"bad argument {text!r}: expected {form}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"bad argument {text!r}: expected {form}")
    return value
