"""Parsing of option values shared by the CLI modules: strict, with messages that say what to do."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

from pipelines.errors import Refused

ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def iso_date(flag: str, text: str) -> dt.date:
    """A calendar date written YYYY-MM-DD, nothing else (no 20270101, no week dates)."""
    try:
        if not ISO_DATE.fullmatch(text):
            raise ValueError(text)
        return dt.date.fromisoformat(text)
    except ValueError as exc:
        raise Refused(f"{flag} must be a date written YYYY-MM-DD (e.g. 2027-01-31), got {text!r}") from exc


def location(text: str) -> str | Path:
    """A location argument (shards, an embeddings file, an export target): an s3:// URI passes unchanged
    (never through Path, which would fold its //); anything else is a local path, exactly as before."""
    return text if text.startswith("s3://") else Path(text)
