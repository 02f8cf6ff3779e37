"""The errors kvsvr raises to its users. Every one is a `KvsvrError`.

Each error has a stable `code` string, which is what travels on the wire, so a
client can raise the same class the node meant.
"""

from __future__ import annotations


class KvsvrError(Exception):
    """Base of every error kvsvr raises on purpose."""

    code = "error"


class Conflict(KvsvrError):
    """A condition (`if_version`, `if_absent`) did not hold; nothing was written."""

    code = "conflict"


class Unavailable(KvsvrError):
    """No majority of the key's replicas answered. The outcome is unknown:
    the operation may or may not have taken effect."""

    code = "unavailable"


class Timeout(Unavailable):
    """The operation ran out of time. The outcome is unknown."""

    code = "timeout"


class InvalidRequest(KvsvrError):
    """The request was malformed (bad key, oversized value, unknown table...);
    nothing was changed."""

    code = "invalid"


class AuthenticationFailed(KvsvrError):
    """The cluster secret did not match."""

    code = "auth"


class CorruptRow(KvsvrError):
    """A stored row failed its crc32c check; it is never served as data."""

    code = "corrupt"


class FrameError(KvsvrError):
    """A wire frame was malformed (bad length, bad crc32c, bad msgpack)."""

    code = "frame"


ERRORS_BY_CODE: dict[str, type[KvsvrError]] = {
    cls.code: cls
    for cls in (
        KvsvrError,
        Conflict,
        Unavailable,
        Timeout,
        InvalidRequest,
        AuthenticationFailed,
        CorruptRow,
        FrameError,
    )
}


def error_from_code(code: str, message: str) -> KvsvrError:
    """Rebuild an error received on the wire; unknown codes become `KvsvrError`."""
    return ERRORS_BY_CODE.get(code, KvsvrError)(message)
