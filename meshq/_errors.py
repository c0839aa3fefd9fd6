"""The exception hierarchy: everything meshq raises derives from MeshqError."""

from __future__ import annotations

import builtins


class MeshqError(Exception):
    """Root of every error meshq raises."""


class TimeoutError(MeshqError, builtins.TimeoutError):  # noqa: A001 - deliberate twin
    """An operation did not complete in time; also catchable as the builtin TimeoutError."""


class ConnectionClosedError(MeshqError):
    """The connection was closed by this side; no further calls are possible."""


class ConnectionLostError(MeshqError):
    """The agent could not be reached (broken, as opposed to closed)."""


class ProtocolError(MeshqError):
    """A protocol rule was broken."""


class LocalProtocolError(ProtocolError):
    """This side tried to send something the protocol does not allow (a bug or bad input here)."""


class RemoteProtocolError(ProtocolError):
    """The other side sent something malformed or not allowed; the frame is dropped and counted."""


class StoreLockedError(MeshqError):
    """The data directory is already in use by another agent."""


class AuthorizationError(MeshqError):
    """The credential does not allow this operation."""


class QuotaExceeded(MeshqError):
    """A tenant quota (size, outbox depth or rate) would be exceeded; `retry_after` hints when to retry."""

    def __init__(self, message: str = "", retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NoRespondersError(MeshqError):
    """A request found nobody serving its subject."""


class BadSubjectError(MeshqError, ValueError):
    """A subject or subject pattern is not well formed."""


class ConfigError(MeshqError, ValueError):
    """A configuration or credentials value or file is missing, malformed or unusable."""


class InsecurePermissionsError(ConfigError):
    """A file holding a secret is accessible by group or others (fix with `chmod 600 FILE`)."""


class BadFilterError(MeshqError, ValueError):
    """A header filter expression is not well formed; the message names the bad clause."""


class CorruptStateError(MeshqError, ValueError):
    """Persisted state could not be decoded (damaged or written by an incompatible version)."""
