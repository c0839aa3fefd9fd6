"""meshq: a brokerless, multi-tenant, highly available message mesh."""

from ._errors import (
    AuthorizationError,
    BadSubjectError,
    ConnectionClosedError,
    ConnectionLostError,
    LocalProtocolError,
    MeshqError,
    NoRespondersError,
    ProtocolError,
    QuotaExceeded,
    RemoteProtocolError,
    StoreLockedError,
    TimeoutError,
)

__version__ = "0.1.0"

__all__ = [
    "AuthorizationError",
    "BadSubjectError",
    "ConnectionClosedError",
    "ConnectionLostError",
    "LocalProtocolError",
    "MeshqError",
    "NoRespondersError",
    "ProtocolError",
    "QuotaExceeded",
    "RemoteProtocolError",
    "StoreLockedError",
    "TimeoutError",
    "__version__",
]
