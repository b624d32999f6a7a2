"""How values enter Lance predicates: always quoted here, never pasted."""

from __future__ import annotations

from pipelines.errors import Refused


def sql_str(value: str) -> str:
    """The one way a value enters a Lance predicate: a quoted SQL string literal, quotes doubled.

    Control characters (NUL, newlines...) are refused: no id or model id needs them, and they are
    where parsers disagree."""
    if not isinstance(value, str):
        raise Refused(f"a predicate value must be a string, got {type(value).__name__}")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise Refused(f"refusing a predicate value with control characters: {value[:40]!r}")
    return "'" + value.replace("'", "''") + "'"


def sql_list(values: list[str]) -> str:
    """A SQL IN-list of values, each quoted by `sql_str`; an empty list matches nothing."""
    return "(" + (", ".join(sql_str(v) for v in values) or "NULL") + ")"
