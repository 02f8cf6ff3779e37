"""Checks of what a caller passes to the client, each with a message that
says what to pass instead. Pure. The node checks the requests it receives
again (`kvsvr.api`'s `from_wire`); these catch a mistake before anything is
sent, in the caller's terms (a `str` value, a negative budget...)."""

from __future__ import annotations

import math
import ssl
from typing import Final

from kvsvr.api import SCAN_LIMIT_MAX, VALUE_BYTES_MAX, ReadConsistency, read_consistency
from kvsvr.errors import InvalidRequest
from kvsvr.net.tls import TLSOptions, TLSSetupError, client_context

# The read consistencies' names, as callers pass them.
CONSISTENCIES: Final = tuple(consistency.value for consistency in ReadConsistency)


def check_value(value: object) -> bytes:
    if not isinstance(value, bytes):
        raise InvalidRequest(
            f"a value must be bytes, not {type(value).__name__} (encode text with .encode())"
        )
    if len(value) > VALUE_BYTES_MAX:
        raise InvalidRequest(f"the value is {len(value)} bytes; the limit is {VALUE_BYTES_MAX}")
    return value


def check_version(if_version: object) -> int | None:
    if if_version is None:
        return None
    if type(if_version) is not int or if_version < 0:
        raise InvalidRequest(f"if_version must be an int >= 0, not {if_version!r}")
    return if_version


def check_consistency(consistency: object) -> ReadConsistency:
    checked = read_consistency(consistency)
    if checked is None:
        raise InvalidRequest(f"consistency must be one of {CONSISTENCIES}, not {consistency!r}")
    return checked


def check_max_age(max_age_s: object) -> float | None:
    if max_age_s is None:
        return None
    if (
        not isinstance(max_age_s, int | float)
        or isinstance(max_age_s, bool)
        or not 0 <= max_age_s < math.inf
    ):
        raise InvalidRequest(f"max_age_s must be a number >= 0 or None, not {max_age_s!r}")
    return float(max_age_s)


def check_near_cache_bytes(near_cache_bytes: object) -> int:
    if near_cache_bytes is None:
        return 0
    if type(near_cache_bytes) is not int or near_cache_bytes < 0:
        raise InvalidRequest(
            f"near_cache_bytes must be an int >= 0 or None, not {near_cache_bytes!r}"
        )
    return near_cache_bytes


def check_limit(limit: object) -> int:
    if type(limit) is not int or not 1 <= limit <= SCAN_LIMIT_MAX:
        raise InvalidRequest(f"limit must be an int from 1 to {SCAN_LIMIT_MAX}, not {limit!r}")
    return limit


def check_timeout(timeout_s: object) -> float:
    if (
        not isinstance(timeout_s, int | float)
        or isinstance(timeout_s, bool)
        or not 0 < timeout_s < math.inf
    ):
        raise InvalidRequest(f"timeout_s must be a number > 0, not {timeout_s!r}")
    return float(timeout_s)


def secret_bytes(secret: str | bytes | None) -> bytes | None:
    if secret is None or isinstance(secret, bytes):
        return secret or None
    if isinstance(secret, str):
        return secret.encode("utf-8") or None
    raise InvalidRequest(f"secret must be str, bytes or None, not {type(secret).__name__}")


def tls_context(tls: object) -> ssl.SSLContext | None:
    """The client's TLS context from its `TLSOptions` (None: plain TCP)."""
    if tls is None:
        return None
    if not isinstance(tls, TLSOptions):
        raise InvalidRequest(f"tls must be a kvsvr.TLSOptions or None, not {type(tls).__name__}")
    try:
        return client_context(tls)
    except TLSSetupError as exc:
        raise InvalidRequest(str(exc)) from None
