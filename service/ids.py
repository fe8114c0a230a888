"""Identifiers and API keys."""

from __future__ import annotations

import hashlib
import secrets
import time

KEY_PREFIX = "rlk_"
KEY_SHOWN_CHARS = 12


def new_id(prefix: str) -> str:
    """``<prefix>-`` then the creation time in milliseconds and 64 random bits, in hex.

    Ids sort by creation time, so list endpoints page with the last id as the cursor.
    """
    return f"{prefix}-{time.time_ns() // 1_000_000:012x}{secrets.token_hex(8)}"


def could_exist(object_id: str) -> bool:
    """Whether ``object_id`` could name a stored object. One with a NUL character cannot, and
    must not reach a query either: PostgreSQL refuses NUL in text (a server error, not a miss)."""
    return "\x00" not in object_id


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    # Keys are 256 random bits, so a plain sha256 suffices: there is nothing to brute-force.
    return hashlib.sha256(key.encode()).hexdigest()
