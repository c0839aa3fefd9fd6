"""meshq: a brokerless, multi-tenant, highly available message mesh."""

from ._client import Client, Message, Subscription, connect
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
    "Client",
    "Message",
    "Subscription",
    "connect",
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
