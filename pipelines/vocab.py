"""Closed vocabularies of the contract: source channels, purposes, quarantine reasons."""

from __future__ import annotations

from enum import StrEnum

ACCEPTED_CHANNELS = (
    "operator-owned",
    "consented-enrollment",
    "official-records",
    "partner-transfer",
)

FORBIDDEN_CHANNELS = {
    "web-scrape": "untargeted scraping of facial images is prohibited (EU AI Act Art. 5(1)(e))",
    "social-media": "social-media content is collected without the subjects' knowledge and against platform terms",
    "bulk-cctv": "bulk CCTV capture is untargeted collection of bystanders' faces",
}

PURPOSES = (
    "criminal-investigation",
    "fraud-investigation",
    "missing-person",
    "victim-identification",
    "child-safeguarding",
    "duplicate-enrollment-check",
)

CHILD_PROTECTION_PURPOSES = ("missing-person", "victim-identification", "child-safeguarding")


class Reason(StrEnum):
    """Why an item was quarantined (one row in the quarantine table)."""

    EMPTY = "EMPTY"
    MISSING_FIELD = "MISSING_FIELD"
    TOO_LARGE_BYTES = "TOO_LARGE_BYTES"
    UNSUPPORTED_FORMAT = "UNSUPPORTED_FORMAT"
    UNDECODABLE = "UNDECODABLE"
    TRUNCATED = "TRUNCATED"
    TOO_MANY_PIXELS = "TOO_MANY_PIXELS"
    IMAGE_ID_MISMATCH = "IMAGE_ID_MISMATCH"
    NO_FACE = "NO_FACE"
    DETECT_FAILED = "DETECT_FAILED"
    BAD_SHARD = "BAD_SHARD"
    WRONG_DIMENSION = "WRONG_DIMENSION"
    NON_FINITE = "NON_FINITE"
    ZERO_VECTOR = "ZERO_VECTOR"
    DUPLICATE_RECORD = "DUPLICATE_RECORD"
    ERASED = "ERASED"
    INVALID_ID = "INVALID_ID"  # an id erasure could never be asked for: never stored
    MINORS_UNDECLARED = "MINORS_UNDECLARED"  # a shard with no minor column (fail closed)
    MINOR_UNKNOWN = "MINOR_UNKNOWN"  # a row whose minor flag is null (fail closed)


def check_channel(channel: str) -> str | None:
    """Return None when the channel is accepted, otherwise the reason it is refused."""
    if channel in ACCEPTED_CHANNELS:
        return None
    if channel in FORBIDDEN_CHANNELS:
        return f"channel {channel!r} is forbidden: {FORBIDDEN_CHANNELS[channel]}"
    return f"channel {channel!r} is not on the accepted list: {', '.join(ACCEPTED_CHANNELS)}"
