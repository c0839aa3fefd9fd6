"""Tenant credentials, client tokens, agent membership proofs, token buckets and rate-limited logs (pure)."""

# Nothing here opens a socket or reads a clock (except RateLimitedLog when no `now` is given); the
# only I/O is reading and writing credential files. Secrets never appear in a repr, str or exception.
#
# Key separation: every tenant secret S yields three independent keys, HKDF-Expand(S, label) =
# HMAC-SHA256(S, b"meshq/v1/" + label + b"\x01"), for client-token signing, agent membership proofs
# and discovery tags, so a value produced for one purpose is never valid for another.

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import stat
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Union

from ._errors import (
    AuthorizationError,
    ConfigError,
    InsecurePermissionsError,
    LocalProtocolError,
    QuotaExceeded,
    RemoteProtocolError,
    TimeoutError,
)
from ._subject import matches, pattern_covers, validate_pattern, validate_subject

__all__ = [
    "SECRET_BYTES",
    "MAX_TOKEN_BYTES",
    "Quotas",
    "TenantSecret",
    "create_tenant",
    "write_tenant_file",
    "load_tenant_file",
    "load_tenant_files",
    "validate_tenant_name",
    "TokenInfo",
    "ClientGrant",
    "ClientCredentials",
    "issue_token",
    "peek_token",
    "verify_token",
    "write_token_file",
    "load_token_file",
    "normalize_curve_key",
    "membership_proof",
    "verify_membership",
    "tenant_tag",
    "match_tags",
    "MembershipHandshake",
    "RateLimiter",
    "RateLimitedLog",
]

SECRET_BYTES = 32                 # size of a freshly created tenant secret
_MAX_SECRET_BYTES = 64            # accepted when loading (hand-made secrets may be longer)
MAX_TOKEN_BYTES = 8192            # tokens larger than this are rejected before any parsing
MAX_FILE_BYTES = 65536            # credential files larger than this are rejected
MAX_PATTERNS = 64                 # per allow list in a token
TAG_BYTES = 8                     # discovery tag length (hex-encoded: 16 characters)
PROOF_BYTES = 32                  # HMAC-SHA256
NONCE_MIN_BYTES = 16
NONCE_MAX_BYTES = 64
NONCE_BYTES = 32                  # default nonce length
MAX_HANDSHAKE_TENANTS = 256       # tags/proofs per handshake message
_MAX_MSG_FIELDS = 16

_TENANT_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_CLIENT_NAME_RE = re.compile(r"[A-Za-z0-9_.@:-]{0,64}")
_B64URL_RE = re.compile(r"[A-Za-z0-9_-]*")
_TAG_RE = re.compile(r"[0-9a-f]{%d}" % (2 * TAG_BYTES))
_TOKEN_PREFIX = "mq1"

_LABEL_TOKEN = b"client-token"
_LABEL_MEMBER = b"agent-membership"
_LABEL_TAG = b"tenant-tag"

_TENANT_FILE_KIND = "meshq-tenant"
_TOKEN_FILE_KIND = "meshq-client-token"
_FILE_VERSION = 1

PathLike = Union[str, "os.PathLike[str]"]


def _derive(secret: bytes, label: bytes) -> bytes:
    """HKDF-Expand(PRK=secret, info=b"meshq/v1/"+label, L=32): one independent key per purpose."""
    return hmac.new(secret, b"meshq/v1/" + label + b"\x01", hashlib.sha256).digest()


def validate_tenant_name(name: str) -> str:
    """Return `name` if it is 1-64 characters of [A-Za-z0-9_-], else raise ConfigError."""
    if not isinstance(name, str) or not _TENANT_RE.fullmatch(name):
        raise ConfigError("tenant name must be 1-64 characters of letters, digits, '_' or '-'")
    return name


# --------------------------------------------------------------------------------------------
# Quotas


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    if _is_int(v):
        return -(1 << 63) <= v <= 1 << 63  # huge JSON ints would overflow float()
    return isinstance(v, float) and math.isfinite(v)


_HARD_MAX_MESSAGE_BYTES = 256 << 20
_HARD_MAX = 1 << 62


@dataclass(frozen=True)
class Quotas:
    """Per-tenant limits; all optional in the tenant file, validated on construction (ConfigError)."""

    max_message_bytes: int = 1 << 20          # largest body + headers accepted from a client
    max_outbox_messages: int = 1_000_000      # pending deliveries per tenant in one agent's outbox
    max_outbox_bytes: int = 1 << 30           # bytes of pending deliveries per tenant
    publish_rate: float | None = None         # messages per second per client; None = unlimited
    publish_burst: int | None = None          # bucket size; None = max(1, ceil(publish_rate))
    retention_seconds: float = 7 * 86400.0    # how long retained/undeliverable messages are kept
    retention_bytes: int = 1 << 30            # retained-log size per tenant

    def __post_init__(self) -> None:
        for name in ("max_message_bytes", "max_outbox_messages", "max_outbox_bytes", "retention_bytes"):
            v = getattr(self, name)
            if not _is_int(v) or not 0 < v <= _HARD_MAX:
                raise ConfigError(f"quota {name} must be a positive integer")
        if self.max_message_bytes > _HARD_MAX_MESSAGE_BYTES:
            raise ConfigError(f"quota max_message_bytes must be at most {_HARD_MAX_MESSAGE_BYTES}")
        if self.max_message_bytes > self.max_outbox_bytes:
            raise ConfigError("quota max_message_bytes must not exceed max_outbox_bytes")
        if not _is_number(self.retention_seconds) or self.retention_seconds <= 0:
            raise ConfigError("quota retention_seconds must be a positive number")
        if self.publish_rate is not None and (not _is_number(self.publish_rate) or self.publish_rate <= 0):
            raise ConfigError("quota publish_rate must be a positive number of messages per second")
        if self.publish_burst is not None:
            if not _is_int(self.publish_burst) or not 0 < self.publish_burst <= _HARD_MAX:
                raise ConfigError("quota publish_burst must be a positive integer")
            if self.publish_rate is None:
                raise ConfigError("quota publish_burst needs publish_rate")

    @property
    def burst(self) -> int | None:
        """The effective bucket size for publish_rate (None when unlimited)."""
        if self.publish_rate is None:
            return None
        return self.publish_burst if self.publish_burst is not None else max(1, math.ceil(self.publish_rate))

    def rate_limiter(self) -> RateLimiter | None:
        """A fresh token bucket for one client of this tenant, or None when publishing is unlimited."""
        if self.publish_rate is None:
            return None
        return RateLimiter(self.publish_rate, self.burst)

    def check_message_size(self, nbytes: int) -> None:
        """Raise QuotaExceeded when a message of `nbytes` is larger than max_message_bytes."""
        if nbytes > self.max_message_bytes:
            raise QuotaExceeded(
                f"message of {nbytes} bytes exceeds the tenant limit of {self.max_message_bytes} bytes"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Quotas:
        """Build from a tenant file's "quotas" object; unknown keys and bad values raise ConfigError."""
        if not isinstance(data, Mapping):
            raise ConfigError("quotas must be an object")
        known = cls.__dataclass_fields__
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise ConfigError(f"unknown quota(s): {', '.join(unknown)}; known: {', '.join(known)}")
        return cls(**dict(data))

    def to_dict(self, omit_defaults: bool = True) -> dict[str, Any]:
        """The JSON form; by default only the values that differ from the defaults."""
        out: dict[str, Any] = {}
        for name, f in self.__dataclass_fields__.items():
            v = getattr(self, name)
            if omit_defaults and v == f.default:
                continue
            out[name] = v
        return out


# --------------------------------------------------------------------------------------------
# Tenant secrets and their file


@dataclass(frozen=True, eq=False)
class TenantSecret:
    """A tenant's name, shared secret and quotas; the secret never appears in repr/str."""

    name: str
    secret: bytes = field(repr=False)
    quotas: Quotas = field(default_factory=Quotas)
    _token_key: bytes = field(init=False, repr=False)
    _member_key: bytes = field(init=False, repr=False)
    _tag_key: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        validate_tenant_name(self.name)
        if isinstance(self.secret, (bytearray, memoryview)):
            object.__setattr__(self, "secret", bytes(self.secret))
        if not isinstance(self.secret, bytes):
            raise ConfigError("tenant secret must be bytes")
        if not SECRET_BYTES <= len(self.secret) <= _MAX_SECRET_BYTES:
            raise ConfigError(f"tenant secret must be {SECRET_BYTES}-{_MAX_SECRET_BYTES} bytes")
        if not isinstance(self.quotas, Quotas):
            raise ConfigError("tenant quotas must be a Quotas instance")
        object.__setattr__(self, "_token_key", _derive(self.secret, _LABEL_TOKEN))
        object.__setattr__(self, "_member_key", _derive(self.secret, _LABEL_MEMBER))
        object.__setattr__(self, "_tag_key", _derive(self.secret, _LABEL_TAG))

    def __repr__(self) -> str:
        return f"TenantSecret(name={self.name!r}, secret=<elided>, quotas={self.quotas!r})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TenantSecret):
            return NotImplemented
        return (
            self.name == other.name
            and hmac.compare_digest(self.secret, other.secret)
            and self.quotas == other.quotas
        )

    def __hash__(self) -> int:
        return hash(self.name)


def create_tenant(name: str, quotas: Quotas | None = None) -> TenantSecret:
    """A new tenant with a fresh random 32-byte secret."""
    return TenantSecret(name, secrets.token_bytes(SECRET_BYTES), quotas if quotas is not None else Quotas())


def _dump_json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode("utf-8")


def _write_secret_file(path: PathLike, data: bytes, force: bool) -> None:
    """Atomically create `path` with mode 0600 holding `data`; refuse to replace it unless `force`."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    if not force and os.path.lexists(path):
        raise FileExistsError(errno.EEXIST, "refusing to overwrite an existing file (use force)", path)
    fd = os.open(tmp, flags, 0o600)
    try:
        try:
            if hasattr(os, "fchmod"):
                os.fchmod(fd, 0o600)  # exact mode whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if force:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # atomic create-if-absent
            except FileExistsError:
                raise FileExistsError(
                    errno.EEXIST, "refusing to overwrite an existing file (use force)", path
                ) from None
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                    raise
                if os.path.lexists(path):  # filesystem without hard links: best effort
                    raise FileExistsError(
                        errno.EEXIST, "refusing to overwrite an existing file (use force)", path
                    ) from None
                os.replace(tmp, path)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
    try:
        dfd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def _read_secret_file(path: PathLike, what: str) -> Any:
    """Read and JSON-decode a secret-bearing file, refusing one accessible by group or others."""
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as e:
        raise ConfigError(f"cannot open {what} {path!r}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{what} {path!r} is not a regular file")
        if os.name == "posix" and st.st_mode & 0o077:
            raise InsecurePermissionsError(
                f"permissions {stat.S_IMODE(st.st_mode):04o} for {what} {path!r} are too open: "
                f"it holds a secret and must not be accessible by group or others "
                f"(run: chmod 600 {path})"
            )
        if st.st_size > MAX_FILE_BYTES:
            raise ConfigError(f"{what} {path!r} is larger than {MAX_FILE_BYTES} bytes")
        chunks = []
        remaining = MAX_FILE_BYTES + 1
        while remaining > 0:
            chunk = os.read(fd, remaining)
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        data = b"".join(chunks)
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"{what} {path!r} is larger than {MAX_FILE_BYTES} bytes")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ConfigError(f"{what} {path!r} is not valid JSON") from None  # `from None`: no doc excerpt


def _check_header(obj: Any, kind: str, allowed: set[str], what: str, path: str) -> dict:
    if not isinstance(obj, dict):
        raise ConfigError(f"{what} {path!r} must hold a JSON object")
    if obj.get("meshq") != kind:
        raise ConfigError(f"{path!r} is not a {what} (expected \"meshq\": \"{kind}\")")
    version = obj.get("version")
    if not _is_int(version) or version != _FILE_VERSION:
        raise ConfigError(f"{what} {path!r} has unsupported version (expected {_FILE_VERSION})")
    unknown = sorted(str(k) for k in obj if k not in allowed)
    if unknown:
        raise ConfigError(f"{what} {path!r} has unknown field(s): {', '.join(unknown)}")
    return obj


def write_tenant_file(path: PathLike, tenant: TenantSecret, *, force: bool = False) -> None:
    """Write the tenant's credentials as JSON, atomically, mode 0600; FileExistsError unless `force`."""
    if not isinstance(tenant, TenantSecret):
        raise TypeError("tenant must be a TenantSecret")
    doc = {
        "meshq": _TENANT_FILE_KIND,
        "version": _FILE_VERSION,
        "tenant": tenant.name,
        "secret": base64.b64encode(tenant.secret).decode("ascii"),
        "quotas": tenant.quotas.to_dict(),
    }
    _write_secret_file(path, _dump_json(doc), force)


def load_tenant_file(path: PathLike) -> TenantSecret:
    """Load and validate a tenant file; ConfigError (InsecurePermissionsError if group/other-accessible)."""
    spath = os.fspath(path)
    what = "tenant file"
    obj = _check_header(
        _read_secret_file(spath, what), _TENANT_FILE_KIND, {"meshq", "version", "tenant", "secret", "quotas"},
        what, spath,
    )
    name = obj.get("tenant")
    if not isinstance(name, str) or not _TENANT_RE.fullmatch(name):
        raise ConfigError(f"{what} {spath!r}: \"tenant\" must be 1-64 characters of letters, digits, '_' or '-'")
    raw = obj.get("secret")
    if not isinstance(raw, str) or len(raw) > 4 * _MAX_SECRET_BYTES:
        raise ConfigError(f"{what} {spath!r}: \"secret\" must be a base64 string")
    try:
        secret = base64.b64decode(raw.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        raise ConfigError(f"{what} {spath!r}: \"secret\" is not valid base64") from None
    if not SECRET_BYTES <= len(secret) <= _MAX_SECRET_BYTES:
        raise ConfigError(f"{what} {spath!r}: \"secret\" must decode to {SECRET_BYTES}-{_MAX_SECRET_BYTES} bytes")
    try:
        quotas = Quotas.from_dict(obj.get("quotas", {}))
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{what} {spath!r}: {e}") from None
    return TenantSecret(name, secret, quotas)


def load_tenant_files(paths: Iterable[PathLike]) -> dict[str, TenantSecret]:
    """Load several tenant files into {name: TenantSecret}; two files for one tenant raise ConfigError."""
    out: dict[str, TenantSecret] = {}
    for p in paths:
        t = load_tenant_file(p)
        if t.name in out:
            raise ConfigError(f"tenant {t.name!r} is defined twice (second time in {os.fspath(p)!r})")
        out[t.name] = t
    return out


# --------------------------------------------------------------------------------------------
# Client tokens


def _b64u_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64u_decode(text: str) -> bytes:
    """Strict unpadded base64url; raise ValueError on anything non-canonical."""
    if not _B64URL_RE.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("bad base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64u_encode(data) != text:
        raise ValueError("non-canonical base64url")
    return data


def _check_patterns(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ConfigError(f"{what} must be a list of subject patterns")
    if len(value) > MAX_PATTERNS:
        raise ConfigError(f"{what} has more than {MAX_PATTERNS} patterns")
    out: list[str] = []
    for p in value:
        validate_pattern(p)  # BadSubjectError
        if p not in out:
            out.append(p)
    return tuple(out)


@dataclass(frozen=True)
class TokenInfo:
    """The claims of a token as written in it, NOT verified: for display and file checks only."""

    tenant: str
    name: str
    allow_pub: tuple[str, ...]
    allow_sub: tuple[str, ...]
    expires: float | None
    token_id: str


@dataclass(frozen=True)
class ClientGrant:
    """What a verified client token allows: its tenant, its name and its publish/subscribe patterns."""

    tenant: str
    name: str
    allow_pub: tuple[str, ...]
    allow_sub: tuple[str, ...]
    expires: float | None = None
    token_id: str = ""

    def may_publish(self, subject: str) -> bool:
        """True when the literal `subject` matches some allow_pub pattern; BadSubjectError if malformed."""
        validate_subject(subject)
        return any(matches(p, subject) for p in self.allow_pub)

    def may_subscribe(self, pattern: str) -> bool:
        """True when some allow_sub pattern covers all of `pattern`; BadSubjectError if malformed."""
        validate_pattern(pattern)
        return any(pattern_covers(p, pattern) for p in self.allow_sub)

    def check_publish(self, subject: str) -> None:
        """Raise AuthorizationError unless may_publish(subject)."""
        if not self.may_publish(subject):
            raise AuthorizationError(f"not allowed to publish to {subject!r}")

    def check_subscribe(self, pattern: str) -> None:
        """Raise AuthorizationError unless may_subscribe(pattern)."""
        if not self.may_subscribe(pattern):
            raise AuthorizationError(f"not allowed to subscribe to {pattern!r}")

    def expired(self, now: float) -> bool:
        """True when the token behind this grant has expired at wall-clock time `now`."""
        return self.expires is not None and now >= self.expires


def issue_token(
    tenant: TenantSecret,
    allow_pub: Iterable[str] = (">",),
    allow_sub: Iterable[str] = (">",),
    name: str = "",
    expires: float | None = None,
) -> str:
    """A signed client token "mq1.<b64url(json claims)>.<b64url(HMAC-SHA256(token key, mq1.<claims>))>"."""
    if not isinstance(tenant, TenantSecret):
        raise TypeError("tenant must be a TenantSecret")
    pub = _check_patterns(list(allow_pub) if not isinstance(allow_pub, str) else allow_pub, "allow_pub")
    sub = _check_patterns(list(allow_sub) if not isinstance(allow_sub, str) else allow_sub, "allow_sub")
    if not isinstance(name, str) or not _CLIENT_NAME_RE.fullmatch(name):
        raise ConfigError("client name must be 0-64 characters of letters, digits, '_', '.', '@', ':' or '-'")
    if expires is not None and not _is_number(expires):
        raise ConfigError("expires must be a finite number (seconds since the epoch) or None")
    claims = {
        "v": 1,
        "tenant": tenant.name,
        "name": name,
        "pub": list(pub),
        "sub": list(sub),
        "exp": expires,
        "jti": secrets.token_hex(8),
    }
    signed = _TOKEN_PREFIX + "." + _b64u_encode(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    mac = hmac.new(tenant._token_key, signed.encode("ascii"), hashlib.sha256).digest()
    token = signed + "." + _b64u_encode(mac)
    if len(token) > MAX_TOKEN_BYTES:
        raise ConfigError(f"token would exceed {MAX_TOKEN_BYTES} bytes; use fewer or shorter patterns")
    return token


_MALFORMED = "token is malformed"


def _split_token(token: str | bytes) -> tuple[str, dict, bytes]:
    """Parse a token into (signed part, raw claims dict, mac) or raise AuthorizationError."""
    if isinstance(token, (bytes, bytearray, memoryview)):
        if len(token) > MAX_TOKEN_BYTES:
            raise AuthorizationError(f"token is larger than {MAX_TOKEN_BYTES} bytes")
        try:
            token = bytes(token).decode("ascii")
        except UnicodeDecodeError:
            raise AuthorizationError(_MALFORMED) from None
    elif not isinstance(token, str):
        raise AuthorizationError(_MALFORMED)
    if len(token) > MAX_TOKEN_BYTES:
        raise AuthorizationError(f"token is larger than {MAX_TOKEN_BYTES} bytes")
    token = token.strip()
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != _TOKEN_PREFIX:
        raise AuthorizationError(_MALFORMED)
    try:
        payload = _b64u_decode(parts[1])
        mac = _b64u_decode(parts[2])
        claims = json.loads(payload.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError, binascii.Error):
        raise AuthorizationError(_MALFORMED) from None
    if not isinstance(claims, dict) or len(mac) != PROOF_BYTES:
        raise AuthorizationError(_MALFORMED)
    return parts[0] + "." + parts[1], claims, mac


def _parse_claims(claims: dict) -> TokenInfo:
    if claims.get("v") != 1 or not _is_int(claims.get("v")):
        raise AuthorizationError("token version is not supported")
    if set(claims) != {"v", "tenant", "name", "pub", "sub", "exp", "jti"}:
        raise AuthorizationError(_MALFORMED)
    tenant, name, exp, jti = claims["tenant"], claims["name"], claims["exp"], claims["jti"]
    if not isinstance(tenant, str) or not _TENANT_RE.fullmatch(tenant):
        raise AuthorizationError(_MALFORMED)
    if not isinstance(name, str) or not _CLIENT_NAME_RE.fullmatch(name):
        raise AuthorizationError(_MALFORMED)
    if exp is not None and not _is_number(exp):
        raise AuthorizationError(_MALFORMED)
    if not isinstance(jti, str) or len(jti) > 64:
        raise AuthorizationError(_MALFORMED)
    try:
        pub = _check_patterns(claims["pub"], "allow_pub")
        sub = _check_patterns(claims["sub"], "allow_sub")
    except (ConfigError, ValueError):
        raise AuthorizationError(_MALFORMED) from None
    return TokenInfo(tenant, name, pub, sub, None if exp is None else float(exp), jti)


def peek_token(token: str | bytes) -> TokenInfo:
    """The token's claims WITHOUT checking its signature or expiry; AuthorizationError if malformed."""
    _, claims, _ = _split_token(token)
    return _parse_claims(claims)


def verify_token(token: str | bytes, tenant_secrets: Mapping[str, TenantSecret], now: float) -> ClientGrant:
    """Verify a client token at wall-clock `now` and return its grant; AuthorizationError otherwise."""
    signed, claims, mac = _split_token(token)
    tenant_name = claims.get("tenant")
    if not isinstance(tenant_name, str) or not _TENANT_RE.fullmatch(tenant_name):
        raise AuthorizationError(_MALFORMED)
    tenant = tenant_secrets.get(tenant_name)
    if tenant is None or tenant.name != tenant_name:
        raise AuthorizationError(f"token is for tenant {tenant_name!r}, which is unknown here")
    expected = hmac.new(tenant._token_key, signed.encode("ascii"), hashlib.sha256).digest()
    if not hmac.compare_digest(expected, mac):
        raise AuthorizationError("token signature is invalid")
    info = _parse_claims(claims)
    if info.expires is not None and now >= info.expires:
        raise AuthorizationError("token has expired")
    return ClientGrant(info.tenant, info.name, info.allow_pub, info.allow_sub, info.expires, info.token_id)


@dataclass(frozen=True)
class ClientCredentials:
    """A loaded token file: the tenant and client name it is for and the token (never shown)."""

    tenant: str
    name: str
    token: str = field(repr=False)

    def __repr__(self) -> str:
        return f"ClientCredentials(tenant={self.tenant!r}, name={self.name!r}, token=<elided>)"

    __str__ = __repr__


def write_token_file(path: PathLike, token: str, *, force: bool = False) -> None:
    """Write a client token file (JSON, mode 0600, atomic); FileExistsError unless `force`."""
    try:
        info = peek_token(token)
    except AuthorizationError as e:
        raise ConfigError(f"cannot write token file: {e}") from None
    doc = {
        "meshq": _TOKEN_FILE_KIND,
        "version": _FILE_VERSION,
        "tenant": info.tenant,
        "name": info.name,
        "token": token if isinstance(token, str) else bytes(token).decode("ascii"),
    }
    _write_secret_file(path, _dump_json(doc), force)


def load_token_file(path: PathLike) -> ClientCredentials:
    """Load a token file (what clients pass as creds=FILE); ConfigError if malformed or insecure."""
    spath = os.fspath(path)
    what = "token file"
    obj = _check_header(
        _read_secret_file(spath, what), _TOKEN_FILE_KIND, {"meshq", "version", "tenant", "name", "token"},
        what, spath,
    )
    token = obj.get("token")
    if not isinstance(token, str):
        raise ConfigError(f"{what} {spath!r}: \"token\" must be a string")
    try:
        info = peek_token(token)
    except AuthorizationError as e:
        raise ConfigError(f"{what} {spath!r}: {e}") from None
    if obj.get("tenant") != info.tenant:
        raise ConfigError(f"{what} {spath!r}: \"tenant\" does not match the tenant inside the token")
    name = obj.get("name", info.name)
    if name != info.name:
        raise ConfigError(f"{what} {spath!r}: \"name\" does not match the name inside the token")
    return ClientCredentials(info.tenant, info.name, token)


# --------------------------------------------------------------------------------------------
# Agent membership proofs and discovery tags

_Z85_CHARS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
_Z85_INDEX = {c: i for i, c in enumerate(_Z85_CHARS)}


def _z85_decode(text: str) -> bytes:
    out = bytearray()
    for i in range(0, len(text), 5):
        value = 0
        for c in text[i:i + 5]:
            value = value * 85 + _Z85_INDEX[c]
        if value >= 1 << 32:
            raise ValueError("z85 group out of range")
        out += value.to_bytes(4, "big")
    return bytes(out)


def normalize_curve_key(key: bytes | str) -> bytes:
    """A CURVE public key as 32 raw bytes, from raw bytes or 40-character Z85 (str or bytes)."""
    if isinstance(key, (bytearray, memoryview)):
        key = bytes(key)
    if isinstance(key, bytes):
        if len(key) == 32:
            return key
        try:
            key = key.decode("ascii")
        except UnicodeDecodeError:
            raise LocalProtocolError("CURVE public key must be 32 raw bytes or 40 Z85 characters") from None
    if not isinstance(key, str) or len(key) != 40:
        raise LocalProtocolError("CURVE public key must be 32 raw bytes or 40 Z85 characters")
    try:
        return _z85_decode(key)
    except (KeyError, ValueError):
        raise LocalProtocolError("CURVE public key is not valid Z85") from None


def _lp(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


def _check_nonce(nonce: Any) -> bytes:
    if not isinstance(nonce, bytes) or not NONCE_MIN_BYTES <= len(nonce) <= NONCE_MAX_BYTES:
        raise LocalProtocolError(f"nonce must be {NONCE_MIN_BYTES}-{NONCE_MAX_BYTES} bytes")
    return nonce


def membership_proof(
    tenant: TenantSecret,
    nonce_mine: bytes,
    nonce_theirs: bytes,
    pubkey_mine: bytes | str,
    pubkey_theirs: bytes | str,
) -> bytes:
    """HMAC(membership key, tenant, prover key, verifier key, prover nonce, verifier nonce): 32 bytes."""
    msg = b"".join((
        b"meshq-membership-v1\x00",
        _lp(tenant.name.encode("ascii")),
        _lp(normalize_curve_key(pubkey_mine)),
        _lp(normalize_curve_key(pubkey_theirs)),
        _lp(_check_nonce(nonce_mine)),
        _lp(_check_nonce(nonce_theirs)),
    ))
    return hmac.new(tenant._member_key, msg, hashlib.sha256).digest()


def verify_membership(
    tenant: TenantSecret,
    proof: bytes,
    nonce_mine: bytes,
    nonce_theirs: bytes,
    pubkey_mine: bytes | str,
    pubkey_theirs: bytes | str,
) -> bool:
    """True when `proof` came from the peer ("theirs") for this link, in constant time ("mine" = verifier)."""
    if not isinstance(proof, bytes) or len(proof) != PROOF_BYTES:
        return False
    expected = membership_proof(tenant, nonce_theirs, nonce_mine, pubkey_theirs, pubkey_mine)
    return hmac.compare_digest(expected, proof)


def _salt_bytes(salt: bytes | str) -> bytes:
    if isinstance(salt, str):
        salt = salt.encode("utf-8")
    if not isinstance(salt, bytes) or not 1 <= len(salt) <= 255:
        raise LocalProtocolError("tag salt must be 1-255 bytes")
    return salt


def tenant_tag(tenant: TenantSecret, salt: bytes | str) -> str:
    """A 16-hex-character tag for `tenant` under `salt`: reveals no name; only members can compute it."""
    mac = hmac.new(tenant._tag_key, b"meshq-tag-v1\x00" + _salt_bytes(salt), hashlib.sha256).digest()
    return mac[:TAG_BYTES].hex()


def _as_tenant_dict(tenants: Mapping[str, TenantSecret] | Iterable[TenantSecret]) -> dict[str, TenantSecret]:
    items = tenants.values() if isinstance(tenants, Mapping) else tenants
    out: dict[str, TenantSecret] = {}
    for t in items:
        if not isinstance(t, TenantSecret):
            raise TypeError("tenants must be TenantSecret instances")
        out[t.name] = t
    return out


def match_tags(
    tags: Iterable[Any], salt: bytes | str, tenants: Mapping[str, TenantSecret] | Iterable[TenantSecret]
) -> set[str]:
    """Names of our `tenants` whose tag under `salt` is among `tags` (non-string tags are ignored)."""
    mine = {tenant_tag(t, salt): name for name, t in _as_tenant_dict(tenants).items()}
    return {mine[tag] for tag in tags if isinstance(tag, str) and tag in mine}


HELLO = "member_hello"
WELCOME = "member_welcome"
PROOF = "member_proof"


# Membership handshake flow (the side that connected is the initiator and calls start()):
#   initiator -> HELLO   {type, v, nonce: Na, tags: [tenant_tag(t, Na) for each of its tenants]}
#   responder -> WELCOME {type, v, nonce: Nb, proofs: {tag: proof_B(t)} for the tags it can match}
#   initiator -> PROOF   {type, v, proofs: {tag: proof_A(t)} for each t whose proof_B verified}
# where proof_X(t) = membership_proof(t, N_X, N_other, pk_X, pk_other) binds both nonces, both CURVE
# keys (as CURVE authenticated them) and the direction, so a proof cannot be replayed on another
# link, reflected back, or relayed by a man in the middle. Tags are salted with the HELLO nonce, so
# they reveal no name and are unlinkable across links. A proof that does not verify raises
# AuthorizationError; anything malformed or out of order raises RemoteProtocolError; a passed
# deadline raises TimeoutError. After any error the handshake is dead: every further receive()
# raises RemoteProtocolError.


class MembershipHandshake:
    """Sans-IO mutual proof of tenant membership on one CURVE link; both sides end with the intersection."""

    def __init__(
        self,
        my_tenants: Mapping[str, TenantSecret] | Iterable[TenantSecret],
        my_pubkey: bytes | str,
        peer_pubkey: bytes | str,
        nonce: bytes | None = None,
        *,
        deadline: float | None = None,
    ) -> None:
        """Prepare a handshake; `nonce` defaults to 32 fresh random bytes, `deadline` is an absolute `now`."""
        self._tenants = _as_tenant_dict(my_tenants)
        if len(self._tenants) > MAX_HANDSHAKE_TENANTS:
            raise LocalProtocolError(f"at most {MAX_HANDSHAKE_TENANTS} tenants per link")
        self._my_pk = normalize_curve_key(my_pubkey)
        self._peer_pk = normalize_curve_key(peer_pubkey)
        if hmac.compare_digest(self._my_pk, self._peer_pk):
            raise LocalProtocolError("peer has our own CURVE key (connected to ourselves?)")
        self._nonce = _check_nonce(secrets.token_bytes(NONCE_BYTES) if nonce is None else nonce)
        self._peer_nonce: bytes | None = None
        self._deadline = deadline
        self._state = "new"     # new → sent_hello | sent_welcome → done | failed
        self.role: str | None = None
        self._offered: dict[str, str] = {}   # initiator: tag(t, Na) -> tenant name
        self._expected: dict[str, str] = {}  # responder: tag(t, Na) -> tenant name it proved
        self._proven: frozenset[str] | None = None

    @property
    def done(self) -> bool:
        """True once this side has its proven set."""
        return self._state == "done"

    @property
    def proven(self) -> frozenset[str] | None:
        """The tenants the peer proved (None until done)."""
        return self._proven

    def timed_out(self, now: float) -> bool:
        """True when the deadline passed before the handshake completed."""
        return self._deadline is not None and now > self._deadline and self._state != "done"

    def start(self) -> dict[str, Any]:
        """Become the initiator and return the HELLO message."""
        if self._state != "new":
            raise LocalProtocolError("handshake already started")
        self.role = "initiator"
        self._offered = {tenant_tag(t, self._nonce): name for name, t in self._tenants.items()}
        self._state = "sent_hello"
        return {"type": HELLO, "v": 1, "nonce": self._nonce, "tags": list(self._offered)}

    def receive(self, msg: Any, now: float) -> tuple[dict[str, Any] | None, frozenset[str] | None]:
        """Feed one peer message; return (reply or None, proven tenants once done else None)."""
        if self._state in ("done", "failed"):
            raise RemoteProtocolError(f"membership handshake is already {self._state}")
        try:
            if self._deadline is not None and now > self._deadline:
                raise TimeoutError("membership handshake timed out")
            kind = self._check_envelope(msg)
            if self._state == "new" and kind == HELLO:
                return self._on_hello(msg), None
            if self._state == "sent_hello" and kind == WELCOME:
                return self._on_welcome(msg)
            if self._state == "sent_welcome" and kind == PROOF:
                return None, self._on_proof(msg)
            raise RemoteProtocolError(f"unexpected {kind} in state {self._state}")
        except BaseException:
            self._state = "failed"
            raise

    # ---- internals

    @staticmethod
    def _check_envelope(msg: Any) -> str:
        if not isinstance(msg, dict):
            raise RemoteProtocolError("membership message must be a map")
        if len(msg) > _MAX_MSG_FIELDS:
            raise RemoteProtocolError("membership message has too many fields")
        kind = msg.get("type")
        if kind not in (HELLO, WELCOME, PROOF) or not isinstance(kind, str):
            raise RemoteProtocolError("membership message has an unknown type")
        v = msg.get("v")
        if not _is_int(v) or v != 1:
            raise RemoteProtocolError("membership message has an unsupported version")
        return kind

    def _take_peer_nonce(self, msg: dict) -> bytes:
        nonce = msg.get("nonce")
        if not isinstance(nonce, bytes) or not NONCE_MIN_BYTES <= len(nonce) <= NONCE_MAX_BYTES:
            raise RemoteProtocolError(f"nonce must be {NONCE_MIN_BYTES}-{NONCE_MAX_BYTES} bytes")
        if hmac.compare_digest(nonce, self._nonce):
            raise RemoteProtocolError("peer echoed our nonce (reflection)")
        self._peer_nonce = nonce
        return nonce

    @staticmethod
    def _take_proofs(msg: dict, allowed: Mapping[str, str]) -> dict[str, bytes]:
        proofs = msg.get("proofs")
        if not isinstance(proofs, dict) or len(proofs) > MAX_HANDSHAKE_TENANTS:
            raise RemoteProtocolError("proofs must be a map of at most %d entries" % MAX_HANDSHAKE_TENANTS)
        for tag, proof in proofs.items():
            if not isinstance(tag, str) or not _TAG_RE.fullmatch(tag):
                raise RemoteProtocolError("proof key is not a tenant tag")
            if not isinstance(proof, bytes) or len(proof) != PROOF_BYTES:
                raise RemoteProtocolError(f"proof must be {PROOF_BYTES} bytes")
            if tag not in allowed:
                raise RemoteProtocolError("proof for a tenant that was not offered")
        return proofs

    def _verify_all(self, proofs: dict[str, bytes], names: Mapping[str, str]) -> frozenset[str]:
        assert self._peer_nonce is not None
        proven = set()
        for tag, proof in proofs.items():
            name = names[tag]
            if not verify_membership(
                self._tenants[name], proof, self._nonce, self._peer_nonce, self._my_pk, self._peer_pk
            ):
                raise AuthorizationError(f"peer failed to prove membership of tenant {name!r}")
            proven.add(name)
        return frozenset(proven)

    def _prove(self, names: Mapping[str, str]) -> dict[str, bytes]:
        assert self._peer_nonce is not None
        return {
            tag: membership_proof(self._tenants[name], self._nonce, self._peer_nonce, self._my_pk, self._peer_pk)
            for tag, name in names.items()
        }

    def _on_hello(self, msg: dict) -> dict[str, Any]:
        self.role = "responder"
        peer_nonce = self._take_peer_nonce(msg)
        tags = msg.get("tags")
        if not isinstance(tags, list) or len(tags) > MAX_HANDSHAKE_TENANTS:
            raise RemoteProtocolError("tags must be a list of at most %d entries" % MAX_HANDSHAKE_TENANTS)
        for tag in tags:
            if not isinstance(tag, str) or not _TAG_RE.fullmatch(tag):
                raise RemoteProtocolError("tag is not %d hex characters" % (2 * TAG_BYTES))
        offered = set(tags)
        mine = {tenant_tag(t, peer_nonce): name for name, t in self._tenants.items()}
        self._expected = {tag: name for tag, name in mine.items() if tag in offered}
        self._state = "sent_welcome"
        return {"type": WELCOME, "v": 1, "nonce": self._nonce, "proofs": self._prove(self._expected)}

    def _on_welcome(self, msg: dict) -> tuple[dict[str, Any], frozenset[str]]:
        self._take_peer_nonce(msg)
        proofs = self._take_proofs(msg, self._offered)
        proven = self._verify_all(proofs, self._offered)
        reply = {
            "type": PROOF,
            "v": 1,
            "proofs": self._prove({tag: self._offered[tag] for tag in proofs}),
        }
        self._proven = proven
        self._state = "done"
        return reply, proven

    def _on_proof(self, msg: dict) -> frozenset[str]:
        proofs = self._take_proofs(msg, self._expected)
        proven = self._verify_all(proofs, self._expected)
        self._proven = proven
        self._state = "done"
        return proven


# --------------------------------------------------------------------------------------------
# Token bucket


class RateLimiter:
    """Token bucket: refills `rate` tokens/s up to `burst`; starts full at the first call's `now`."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        """`burst` defaults to max(1, ceil(rate)); rate > 0 and burst >= 1, else ConfigError."""
        if not _is_number(rate) or rate <= 0:
            raise ConfigError("rate must be a positive finite number")
        if burst is None:
            burst = max(1, math.ceil(rate))
        if not _is_number(burst) or burst < 1:
            raise ConfigError("burst must be a finite number >= 1")
        self.rate = float(rate)
        self.burst = float(burst)
        self._tokens = self.burst
        self._last: float | None = None
        self._eps = 1e-9 * max(1.0, self.burst)

    def _tolerance(self, now: float) -> float:
        # float time has a resolution of ulp(now); waiting exactly delay_for() must always suffice
        return self._eps + self.rate * 4 * math.ulp(now)

    def _refill(self, now: float) -> None:
        if self._last is None:
            self._last = now
        elif now > self._last:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
        # a clock that goes backwards adds nothing

    def _check_n(self, n: float) -> None:
        if not _is_number(n) or n < 0:
            raise ValueError("n must be a non-negative number")
        if n > self.burst:
            raise QuotaExceeded(f"{n} tokens can never be granted by a bucket of {self.burst:g}")

    def available(self, now: float) -> float:
        """Tokens in the bucket at `now`."""
        self._refill(now)
        return self._tokens

    def try_acquire(self, n: float, now: float) -> bool:
        """Take `n` tokens if available at `now`; QuotaExceeded if n > burst (it never could be)."""
        self._check_n(n)
        self._refill(now)
        if self._tokens + self._tolerance(now) >= n:
            self._tokens = max(0.0, self._tokens - n)
            return True
        return False

    def delay_for(self, n: float, now: float) -> float:
        """Seconds from `now` until `n` tokens are available (0.0 if now); takes nothing."""
        self._check_n(n)
        self._refill(now)
        deficit = n - self._tokens
        return 0.0 if deficit <= self._tolerance(now) else deficit / self.rate


# --------------------------------------------------------------------------------------------
# Rate-limited logging


class _Formatted:
    """Lazily renders `msg % args` the way logging would, tolerating format errors."""

    __slots__ = ("msg", "args")

    def __init__(self, msg: Any, args: tuple) -> None:
        self.msg, self.args = msg, args

    def __str__(self) -> str:
        if not self.args:
            return str(self.msg)
        try:
            return str(self.msg) % self.args
        except (TypeError, ValueError, KeyError):
            return f"{self.msg} {self.args!r}"


class RateLimitedLog:
    """Logs each key at most once per `interval` seconds and reports how many were suppressed between."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0, *, max_keys: int = 4096) -> None:
        """Track at most `max_keys` keys (least recently emitted forgotten first) so peers cannot grow memory."""
        if not _is_number(interval) or interval < 0:
            raise ConfigError("interval must be a non-negative number of seconds")
        if not _is_int(max_keys) or max_keys < 1:
            raise ConfigError("max_keys must be a positive integer")
        self.logger = logger
        self.interval = float(interval)
        self.max_keys = max_keys
        self._entries: OrderedDict[Any, list] = OrderedDict()  # key -> [last emit time, suppressed]

    def suppressed(self, key: Any) -> int:
        """Messages for `key` suppressed since its last emit."""
        entry = self._entries.get(key)
        return entry[1] if entry else 0

    def log(self, level: int, key: Any, msg: Any, *args: Any, now: float | None = None) -> bool:
        """Log unless `key` was logged less than `interval` ago (then count it); True if emitted."""
        return self._log(level, key, msg, args, now)

    def debug(self, key: Any, msg: Any, *args: Any, now: float | None = None) -> bool:
        """log(DEBUG, ...)."""
        return self._log(logging.DEBUG, key, msg, args, now)

    def info(self, key: Any, msg: Any, *args: Any, now: float | None = None) -> bool:
        """log(INFO, ...)."""
        return self._log(logging.INFO, key, msg, args, now)

    def warning(self, key: Any, msg: Any, *args: Any, now: float | None = None) -> bool:
        """log(WARNING, ...)."""
        return self._log(logging.WARNING, key, msg, args, now)

    def error(self, key: Any, msg: Any, *args: Any, now: float | None = None) -> bool:
        """log(ERROR, ...)."""
        return self._log(logging.ERROR, key, msg, args, now)

    def _log(self, level: int, key: Any, msg: Any, args: tuple, now: float | None) -> bool:
        if not self.logger.isEnabledFor(level):
            return False
        if now is None:
            now = time.monotonic()
        entry = self._entries.get(key)
        if entry is not None and now - entry[0] < self.interval:
            entry[1] += 1
            return False
        suppressed = entry[1] if entry is not None else 0
        if entry is None:
            self._entries[key] = [now, 0]
            while len(self._entries) > self.max_keys:
                self._entries.popitem(last=False)
        else:
            entry[0], entry[1] = now, 0
            self._entries.move_to_end(key)
        extra = {"meshq_suppressed": suppressed}
        if suppressed:
            self.logger.log(
                level, "%s (%d similar messages suppressed)", _Formatted(msg, args), suppressed,
                extra=extra, stacklevel=3,
            )
        else:
            self.logger.log(level, "%s", _Formatted(msg, args), extra=extra, stacklevel=3)
        return True
