"""The errors kvsvr raises to its users. Every one is a `KvsvrError`.

Each error has a stable `code` string, which is what travels on the wire, so a
client can raise the same class the node meant.
"""

from __future__ import annotations

import re


class KvsvrError(Exception):
    """Base of every error kvsvr raises on purpose."""

    code = "error"


class Conflict(KvsvrError):
    """A condition (`if_version`, `if_absent`) did not hold; nothing was written.

    `current_version` is the key's latest chosen version at some moment during
    the call (None when the node did not say, as an older node would not): a
    client doing optimistic concurrency re-reads from there.
    """

    code = "conflict"

    def __init__(self, message: str, current_version: int | None = None) -> None:
        super().__init__(message)
        self.current_version = current_version

    @classmethod
    def of_version(cls, current_version: int) -> Conflict:
        """The error a node answers with; its text is what travels on the wire."""
        return cls(_CONFLICT_MESSAGE.format(current_version), current_version)

    @classmethod
    def from_message(cls, message: str) -> Conflict:
        """The error a client rebuilds from the wire, with the version it names."""
        match = _CONFLICT_VERSION.search(message)
        return cls(message, int(match.group(1)) if match else None)


# What a Conflict says on the wire; `from_message` reads the version back.
_CONFLICT_MESSAGE = "condition failed; the current version is {}"
_CONFLICT_VERSION = re.compile(r"the current version is (\d+)")


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


class WatchCompacted(KvsvrError):
    """The history a watch needs to resume from its version is gone (the
    node's change log is bounded): read the key again and watch from there."""

    code = "watch_compacted"


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
        WatchCompacted,
    )
}


def error_from_code(code: str, message: str) -> KvsvrError:
    """Rebuild an error received on the wire; unknown codes become `KvsvrError`."""
    if code == Conflict.code:
        return Conflict.from_message(message)
    return ERRORS_BY_CODE.get(code, KvsvrError)(message)
