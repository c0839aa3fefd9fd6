"""Tests for meshq._auth: tenant files, client tokens, membership handshake, rate limits, log suppression."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import math
import os
import stat

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshq._auth import (
    HELLO,
    MAX_TOKEN_BYTES,
    PROOF,
    WELCOME,
    ClientCredentials,
    ClientGrant,
    MembershipHandshake,
    Quotas,
    RateLimitedLog,
    RateLimiter,
    TenantSecret,
    create_tenant,
    issue_token,
    load_tenant_file,
    load_tenant_files,
    load_token_file,
    match_tags,
    membership_proof,
    normalize_curve_key,
    peek_token,
    tenant_tag,
    validate_tenant_name,
    verify_membership,
    verify_token,
    write_tenant_file,
    write_token_file,
)
from meshq._errors import (
    AuthorizationError,
    BadSubjectError,
    ConfigError,
    InsecurePermissionsError,
    LocalProtocolError,
    MeshqError,
    QuotaExceeded,
    RemoteProtocolError,
    TimeoutError,
)

posix_only = pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")

PK_A = bytes(range(32))
PK_B = bytes(range(32, 64))
PK_M = bytes(range(64, 96))


def _secret_strings(t: TenantSecret) -> list[str]:
    return [base64.b64encode(t.secret).decode(), t.secret.hex(), repr(t.secret)]


def _assert_no_secret(text: str, t: TenantSecret) -> None:
    for s in _secret_strings(t):
        assert s not in text


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# ---------------------------------------------------------------------------------------------
# tenant names, quotas


@pytest.mark.parametrize("name", ["a", "acme", "ACME_prod-2", "x" * 64, "_", "-"])
def test_valid_tenant_names(name):
    assert validate_tenant_name(name) == name
    assert create_tenant(name).name == name


@pytest.mark.parametrize("name", ["", "x" * 65, "a.b", "a b", "ä", "a\n", "a/b", None, 5, b"acme"])
def test_invalid_tenant_names(name):
    with pytest.raises(ConfigError):
        validate_tenant_name(name)
    with pytest.raises(ConfigError):
        create_tenant(name)


def test_quotas_defaults_and_validation():
    q = Quotas()
    assert q.max_message_bytes == 1 << 20
    assert q.publish_rate is None and q.burst is None and q.rate_limiter() is None
    assert q.to_dict() == {}
    full = q.to_dict(omit_defaults=False)
    assert set(full) == {
        "max_message_bytes", "max_outbox_messages", "max_outbox_bytes", "publish_rate",
        "publish_burst", "retention_seconds", "retention_bytes",
    }
    assert Quotas.from_dict(full) == q

    q2 = Quotas(publish_rate=2.5)
    assert q2.burst == 3
    assert Quotas(publish_rate=100, publish_burst=10).burst == 10
    rl = Quotas(publish_rate=5, publish_burst=2).rate_limiter()
    assert rl.rate == 5 and rl.burst == 2

    q.check_message_size(1 << 20)
    with pytest.raises(QuotaExceeded):
        q.check_message_size((1 << 20) + 1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_message_bytes": 0},
        {"max_message_bytes": -1},
        {"max_message_bytes": 1.5},
        {"max_message_bytes": True},
        {"max_message_bytes": "10"},
        {"max_message_bytes": 1 << 30},  # above the hard cap
        {"max_message_bytes": 2000, "max_outbox_bytes": 1000},
        {"max_outbox_messages": 0},
        {"retention_seconds": 0},
        {"retention_seconds": float("inf")},
        {"retention_seconds": float("nan")},
        {"retention_bytes": None},
        {"publish_rate": 0},
        {"publish_rate": -3},
        {"publish_rate": float("inf")},
        {"publish_rate": "fast"},
        {"publish_burst": 5},  # burst without rate
        {"publish_rate": 1, "publish_burst": 0},
        {"publish_rate": 1, "publish_burst": 1.5},
    ],
)
def test_quotas_rejects_bad_values(kwargs):
    with pytest.raises(ConfigError):
        Quotas(**kwargs)
    with pytest.raises(ConfigError):
        Quotas.from_dict(kwargs)


def test_quotas_from_dict_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="max_msg_bytes"):
        Quotas.from_dict({"max_msg_bytes": 10})
    with pytest.raises(ConfigError):
        Quotas.from_dict(["max_message_bytes"])


# ---------------------------------------------------------------------------------------------
# tenant secrets and files


def test_tenant_secret_never_shown():
    t = create_tenant("acme")
    assert len(t.secret) == 32
    for text in (repr(t), str(t), f"{t}", repr([t]), repr({"t": t})):
        assert "acme" in text or "TenantSecret" in text
        _assert_no_secret(text, t)
    assert "<elided>" in repr(t)


def test_tenant_secret_equality_and_separate_keys():
    t = create_tenant("acme")
    same = TenantSecret("acme", t.secret)
    other = create_tenant("acme")
    assert t == same and hash(t) == hash(same)
    assert t != other
    keys = {t.secret, t._token_key, t._member_key, t._tag_key}
    assert len(keys) == 4  # every purpose has its own key


@pytest.mark.parametrize("secret", [b"short", b"x" * 31, b"x" * 65, "x" * 32, None])
def test_tenant_secret_rejects_bad_secret(secret):
    with pytest.raises(ConfigError):
        TenantSecret("acme", secret)


@posix_only
def test_tenant_file_roundtrip_and_mode(tmp_path):
    t = create_tenant("acme", Quotas(max_message_bytes=4096, publish_rate=50.0, publish_burst=100))
    path = tmp_path / "acme.tenant"
    write_tenant_file(path, t)
    assert _mode(path) == 0o600
    doc = json.loads(path.read_text())
    assert doc["meshq"] == "meshq-tenant" and doc["version"] == 1 and doc["tenant"] == "acme"
    assert base64.b64decode(doc["secret"]) == t.secret
    assert doc["quotas"] == {"max_message_bytes": 4096, "publish_rate": 50.0, "publish_burst": 100}
    loaded = load_tenant_file(path)
    assert loaded == t and loaded.quotas == t.quotas
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind


@posix_only
def test_tenant_file_mode_is_0600_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        write_tenant_file(tmp_path / "t.json", create_tenant("acme"))
    finally:
        os.umask(old)
    assert _mode(tmp_path / "t.json") == 0o600


def test_tenant_file_refuses_overwrite_unless_forced(tmp_path):
    path = tmp_path / "t.json"
    first, second = create_tenant("acme"), create_tenant("acme")
    write_tenant_file(path, first)
    with pytest.raises(FileExistsError):
        write_tenant_file(path, second)
    assert load_tenant_file(path) == first
    write_tenant_file(path, second, force=True)
    assert load_tenant_file(path) == second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]


def test_tenant_file_refuses_to_replace_a_symlink(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("keep")
    link = tmp_path / "t.json"
    link.symlink_to(target)
    with pytest.raises(FileExistsError):
        write_tenant_file(link, create_tenant("acme"))
    assert target.read_text() == "keep"


@posix_only
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o620, 0o602, 0o666, 0o700 | 0o007])
def test_tenant_file_refuses_group_or_other_access(tmp_path, mode):
    t = create_tenant("acme")
    path = tmp_path / "t.json"
    write_tenant_file(path, t)
    os.chmod(path, mode)
    with pytest.raises(InsecurePermissionsError) as exc:
        load_tenant_file(path)
    msg = str(exc.value)
    assert "too open" in msg and "chmod 600" in msg and str(path) in msg and f"{mode:04o}" in msg
    _assert_no_secret(msg, t)
    assert isinstance(exc.value, ConfigError) and isinstance(exc.value, MeshqError)


@posix_only
@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700])
def test_tenant_file_owner_only_modes_are_accepted(tmp_path, mode):
    t = create_tenant("acme")
    path = tmp_path / "t.json"
    write_tenant_file(path, t)
    os.chmod(path, mode)
    assert load_tenant_file(path) == t


def _good_doc(t: TenantSecret) -> dict:
    return {
        "meshq": "meshq-tenant",
        "version": 1,
        "tenant": t.name,
        "secret": base64.b64encode(t.secret).decode(),
        "quotas": {},
    }


def _write_private(path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


BAD_TENANT_DOCS = [
    ("not a dict", lambda d: [d]),
    ("wrong kind", lambda d: {**d, "meshq": "meshq-client-token"}),
    ("no kind", lambda d: {k: v for k, v in d.items() if k != "meshq"}),
    ("bad version", lambda d: {**d, "version": 2}),
    ("bool version", lambda d: {**d, "version": True}),
    ("unknown field", lambda d: {**d, "extra": 1}),
    ("no tenant", lambda d: {k: v for k, v in d.items() if k != "tenant"}),
    ("bad tenant", lambda d: {**d, "tenant": "a b"}),
    ("tenant not str", lambda d: {**d, "tenant": 7}),
    ("no secret", lambda d: {k: v for k, v in d.items() if k != "secret"}),
    ("secret not str", lambda d: {**d, "secret": 12345}),
    ("secret not base64", lambda d: {**d, "secret": d["secret"][:-4] + "!!!!"}),
    ("secret too short", lambda d: {**d, "secret": base64.b64encode(b"x" * 16).decode()}),
    ("quotas not dict", lambda d: {**d, "quotas": [1]}),
    ("unknown quota", lambda d: {**d, "quotas": {"max_bytes": 1}}),
    ("bad quota", lambda d: {**d, "quotas": {"publish_rate": -1}}),
]


@pytest.mark.parametrize("label,mutate", BAD_TENANT_DOCS, ids=[b[0] for b in BAD_TENANT_DOCS])
def test_tenant_file_validation(tmp_path, label, mutate):
    t = create_tenant("acme")
    path = tmp_path / "t.json"
    _write_private(path, json.dumps(mutate(_good_doc(t))))
    with pytest.raises(ConfigError) as exc:
        load_tenant_file(path)
    _assert_no_secret(str(exc.value), t)
    assert exc.value.__cause__ is None or "secret" not in repr(exc.value.__cause__)


@pytest.mark.parametrize("content", [b"", b"{", b"\xff\xfe", b"[" * 5000, b"null", b" " * 70000])
def test_tenant_file_garbage(tmp_path, content):
    path = tmp_path / "t.json"
    _write_private(path, "")
    path.write_bytes(content)
    with pytest.raises(ConfigError):
        load_tenant_file(path)


def test_tenant_file_errors_do_not_chain_the_document(tmp_path):
    t = create_tenant("acme")
    path = tmp_path / "t.json"
    _write_private(path, json.dumps(_good_doc(t))[:-3])  # truncated JSON still holding the secret
    with pytest.raises(ConfigError) as exc:
        load_tenant_file(path)
    assert exc.value.__cause__ is None and exc.value.__suppress_context__


def test_missing_or_non_regular_tenant_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot open"):
        load_tenant_file(tmp_path / "nope.json")
    with pytest.raises(ConfigError):
        load_tenant_file(tmp_path)


def test_load_tenant_files(tmp_path):
    a, b = create_tenant("a"), create_tenant("b")
    write_tenant_file(tmp_path / "a.json", a)
    write_tenant_file(tmp_path / "b.json", b)
    write_tenant_file(tmp_path / "a2.json", create_tenant("a"))
    assert load_tenant_files([tmp_path / "a.json", tmp_path / "b.json"]) == {"a": a, "b": b}
    with pytest.raises(ConfigError, match="twice"):
        load_tenant_files([tmp_path / "a.json", tmp_path / "a2.json"])


# ---------------------------------------------------------------------------------------------
# client tokens


@pytest.fixture
def acme():
    return create_tenant("acme")


def test_token_roundtrip(acme):
    tok = issue_token(acme, allow_pub=["orders.*", "metrics.>"], allow_sub=["orders.>"], name="billing",
                      expires=2000.0)
    assert isinstance(tok, str) and tok.startswith("mq1.") and tok.count(".") == 2
    grant = verify_token(tok, {"acme": acme}, now=1000.0)
    assert isinstance(grant, ClientGrant)
    assert grant.tenant == "acme" and grant.name == "billing"
    assert grant.allow_pub == ("orders.*", "metrics.>") and grant.allow_sub == ("orders.>",)
    assert grant.expires == 2000.0 and not grant.expired(1999.9) and grant.expired(2000.0)
    assert verify_token(tok.encode(), {"acme": acme}, now=1000.0) == grant
    info = peek_token(tok)
    assert (info.tenant, info.name, info.allow_pub, info.expires) == ("acme", "billing", grant.allow_pub, 2000.0)
    _assert_no_secret(tok, acme)


def test_token_defaults_allow_everything(acme):
    grant = verify_token(issue_token(acme), {"acme": acme}, now=0)
    assert grant.allow_pub == (">",) and grant.allow_sub == (">",) and grant.name == "" and grant.expires is None
    assert grant.may_publish("a.b.c") and grant.may_subscribe(">") and grant.may_subscribe("a.*")


def test_tokens_are_unique(acme):
    assert issue_token(acme) != issue_token(acme)


def test_token_expiry(acme):
    tok = issue_token(acme, expires=100)
    verify_token(tok, {"acme": acme}, now=99.999)
    for now in (100, 100.5, 1e12):
        with pytest.raises(AuthorizationError, match="expired"):
            verify_token(tok, {"acme": acme}, now=now)


def test_token_unknown_tenant_and_wrong_secret(acme):
    tok = issue_token(acme)
    with pytest.raises(AuthorizationError, match="unknown"):
        verify_token(tok, {}, now=0)
    with pytest.raises(AuthorizationError, match="unknown"):
        verify_token(tok, {"other": create_tenant("other")}, now=0)
    impostor = create_tenant("acme")  # same name, different secret
    with pytest.raises(AuthorizationError, match="signature"):
        verify_token(tok, {"acme": impostor}, now=0)


def _resign(tenant_key: bytes, claims: dict) -> str:
    payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    signed = "mq1." + payload
    mac = hmac.new(tenant_key, signed.encode(), hashlib.sha256).digest()
    return signed + "." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def test_token_tampering_is_detected(acme):
    tok = issue_token(acme, allow_pub=["orders.eu"], allow_sub=["orders.eu"], name="svc")
    prefix, payload, sig = tok.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    # widen the grant, keep the old signature
    widened = dict(claims, pub=[">"])
    forged_payload = base64.urlsafe_b64encode(json.dumps(widened).encode()).rstrip(b"=").decode()
    with pytest.raises(AuthorizationError, match="signature"):
        verify_token(f"{prefix}.{forged_payload}.{sig}", {"acme": acme}, now=0)
    # every single-character change in the payload or signature is rejected
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    for i in range(len(tok)):
        if tok[i] == ".":
            continue
        repl = alphabet[(alphabet.find(tok[i]) + 1) % len(alphabet)] if tok[i] in alphabet else "A"
        with pytest.raises(AuthorizationError):
            verify_token(tok[:i] + repl + tok[i + 1:], {"acme": acme}, now=0)


def test_token_signed_with_another_purpose_key_is_rejected(acme):
    claims = json.loads(base64.urlsafe_b64decode(issue_token(acme).split(".")[1] + "=="))
    for key in (acme.secret, acme._member_key, acme._tag_key):
        with pytest.raises(AuthorizationError, match="signature"):
            verify_token(_resign(key, claims), {"acme": acme}, now=0)
    verify_token(_resign(acme._token_key, claims), {"acme": acme}, now=0)  # control


@pytest.mark.parametrize(
    "change",
    [
        {"v": 2},
        {"v": True},
        {"pub": "orders.>"},
        {"pub": ["a.>.b"]},
        {"sub": [""]},
        {"sub": [1]},
        {"exp": "tomorrow"},
        {"exp": True},
        {"exp": 10**400},
        {"exp": -(10**30)},
        {"name": "a b"},
        {"jti": 5},
        {"extra": 1},
    ],
)
def test_token_bad_claims_are_malformed_even_when_signed(acme, change):
    claims = json.loads(base64.urlsafe_b64decode(issue_token(acme).split(".")[1] + "=="))
    claims.update(change)
    with pytest.raises(AuthorizationError):
        verify_token(_resign(acme._token_key, claims), {"acme": acme}, now=0)


@pytest.mark.parametrize(
    "token",
    [
        "", ".", "..", "mq1..", "mq2.e30.AAAA", "mq1.e30", "mq1.e30.AAAA.x", "mq1.!!!.AAAA",
        "mq1.e30.AAAA", "mq1.W10." + "A" * 43, b"\xff\xfe", None, 12, ["mq1"], "mq1.e30=." + "A" * 43,
        "mq1." + "W" * 6000 + "." + "A" * 43,
    ],
)
def test_token_malformed(acme, token):
    with pytest.raises(AuthorizationError):
        verify_token(token, {"acme": acme}, now=0)


def test_token_huge_numbers_are_malformed_not_crashes(acme, tmp_path):
    claims = json.loads(base64.urlsafe_b64decode(issue_token(acme).split(".")[1] + "=="))
    tok = _resign(acme._token_key, dict(claims, exp=10**400))
    with pytest.raises(AuthorizationError):
        peek_token(tok)
    with pytest.raises(AuthorizationError):
        verify_token(tok, {"acme": acme}, now=0)
    with pytest.raises(ConfigError):
        write_token_file(tmp_path / "c.json", tok)


def test_token_verification_checks_mapping_consistency(acme):
    with pytest.raises(AuthorizationError):  # a misconfigured mapping never grants another tenant
        verify_token(issue_token(acme), {"acme": create_tenant("other")}, now=0)


def test_token_size_bound(acme):
    huge = "mq1." + "A" * MAX_TOKEN_BYTES + ".AAAA"
    with pytest.raises(AuthorizationError, match=str(MAX_TOKEN_BYTES)):
        verify_token(huge, {"acme": acme}, now=0)
    with pytest.raises(AuthorizationError, match=str(MAX_TOKEN_BYTES)):
        verify_token(huge.encode(), {"acme": acme}, now=0)
    with pytest.raises(ConfigError):
        issue_token(acme, allow_pub=["x" * 1000 + f".{i}" for i in range(60)])


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300),
                 st.builds(lambda a, b: f"mq1.{a}.{b}", st.text("A-_Za9=.", max_size=80),
                           st.text("A-_Za9=.", max_size=80))))
def test_token_garbage_only_raises_authorization_error(acme, garbage):
    with pytest.raises(AuthorizationError):
        verify_token(garbage, {"acme": acme}, now=0)


def test_token_issue_validation(acme):
    with pytest.raises(BadSubjectError):
        issue_token(acme, allow_pub=["a..b"])
    with pytest.raises(BadSubjectError):
        issue_token(acme, allow_sub=["a.>.b"])
    with pytest.raises(ConfigError):
        issue_token(acme, allow_pub="orders.>")  # a bare string is a mistake, not a list of chars
    with pytest.raises(ConfigError):
        issue_token(acme, name="has space")
    with pytest.raises(ConfigError):
        issue_token(acme, expires=float("nan"))
    assert peek_token(issue_token(acme, allow_pub=["a", "a", "b"])).allow_pub == ("a", "b")
    assert peek_token(issue_token(acme, allow_pub=[])).allow_pub == ()


def test_grant_permissions_with_wildcards():
    g = ClientGrant("acme", "svc", allow_pub=("orders.*", "metrics.>"), allow_sub=("orders.>", "alerts.*"))
    assert g.may_publish("orders.new")
    assert not g.may_publish("orders.eu.new")
    assert not g.may_publish("orders")
    assert g.may_publish("metrics.cpu") and g.may_publish("metrics.cpu.host1")
    assert not g.may_publish("metrics")
    assert not g.may_publish("billing.x")
    g.check_publish("orders.new")
    with pytest.raises(AuthorizationError, match="billing.x"):
        g.check_publish("billing.x")

    assert g.may_subscribe("orders.>") and g.may_subscribe("orders.*") and g.may_subscribe("orders.eu.*")
    assert g.may_subscribe("orders.eu.new")
    assert not g.may_subscribe("orders")
    assert not g.may_subscribe(">") and not g.may_subscribe("*.new") and not g.may_subscribe("*.>")
    assert g.may_subscribe("alerts.*") and g.may_subscribe("alerts.disk")
    assert not g.may_subscribe("alerts.>")  # '*' covers one token, '>' could be many
    assert not g.may_subscribe("alerts.disk.full")
    with pytest.raises(AuthorizationError):
        g.check_subscribe(">")
    g.check_subscribe("orders.*")

    with pytest.raises(BadSubjectError):
        g.may_publish("orders.*")  # publishing needs a literal subject
    with pytest.raises(BadSubjectError):
        g.may_subscribe("orders..x")

    nothing = ClientGrant("acme", "ro", allow_pub=(), allow_sub=(">",))
    assert not nothing.may_publish("a") and nothing.may_subscribe("a.>")


@posix_only
def test_token_file_roundtrip(tmp_path, acme):
    tok = issue_token(acme, allow_sub=["orders.>"], name="svc")
    path = tmp_path / "svc.creds"
    write_token_file(path, tok)
    assert _mode(path) == 0o600
    doc = json.loads(path.read_text())
    assert doc == {"meshq": "meshq-client-token", "version": 1, "tenant": "acme", "name": "svc", "token": tok}
    creds = load_token_file(path)
    assert isinstance(creds, ClientCredentials)
    assert (creds.tenant, creds.name, creds.token) == ("acme", "svc", tok)
    assert tok not in repr(creds) and tok not in str(creds) and "<elided>" in repr(creds)
    assert verify_token(creds.token, {"acme": acme}, now=0).allow_sub == ("orders.>",)

    with pytest.raises(FileExistsError):
        write_token_file(path, issue_token(acme))
    write_token_file(path, issue_token(acme, name="other"), force=True)
    assert load_token_file(path).name == "other"

    os.chmod(path, 0o644)
    with pytest.raises(InsecurePermissionsError):
        load_token_file(path)


def test_token_file_validation(tmp_path, acme):
    tok = issue_token(acme, name="svc")
    good = {"meshq": "meshq-client-token", "version": 1, "tenant": "acme", "name": "svc", "token": tok}
    for bad in (
        {**good, "tenant": "other"},
        {**good, "name": "other"},
        {**good, "token": "garbage"},
        {**good, "token": 5},
        {**good, "meshq": "meshq-tenant"},
        {**good, "extra": True},
    ):
        path = tmp_path / "c.json"
        _write_private(path, json.dumps(bad))
        with pytest.raises(ConfigError):
            load_token_file(path)
    with pytest.raises(ConfigError):
        write_token_file(tmp_path / "x.json", "not a token")
    write_tenant_file(tmp_path / "t.json", acme)
    with pytest.raises(ConfigError):  # a tenant file is not a token file
        load_token_file(tmp_path / "t.json")
    with pytest.raises(ConfigError):  # and vice versa
        load_tenant_file(path)


# ---------------------------------------------------------------------------------------------
# membership proofs, tags


NA = b"a" * 32
NB = b"b" * 32


def test_membership_proof_direction_and_binding(acme):
    proof_a = membership_proof(acme, NA, NB, PK_A, PK_B)
    assert len(proof_a) == 32
    # B verifies A's proof: "mine" is B's side
    assert verify_membership(acme, proof_a, NB, NA, PK_B, PK_A)
    # reflected back to A it is worthless
    assert not verify_membership(acme, proof_a, NA, NB, PK_A, PK_B)
    # bound to every input
    assert not verify_membership(acme, proof_a, NB, b"c" * 32, PK_B, PK_A)
    assert not verify_membership(acme, proof_a, b"c" * 32, NA, PK_B, PK_A)
    assert not verify_membership(acme, proof_a, NB, NA, PK_M, PK_A)
    assert not verify_membership(acme, proof_a, NB, NA, PK_B, PK_M)
    assert not verify_membership(create_tenant("acme"), proof_a, NB, NA, PK_B, PK_A)
    assert not verify_membership(acme, proof_a[:-1], NB, NA, PK_B, PK_A)
    assert not verify_membership(acme, "x" * 32, NB, NA, PK_B, PK_A)
    with pytest.raises(LocalProtocolError):
        membership_proof(acme, b"short", NB, PK_A, PK_B)
    with pytest.raises(LocalProtocolError):
        membership_proof(acme, NA, NB, b"x" * 31, PK_B)


def test_curve_key_normalization():
    zmq = pytest.importorskip("zmq")
    z85 = pytest.importorskip("zmq.utils.z85")
    public, _secret = zmq.curve_keypair()
    raw = z85.decode(public)
    assert len(raw) == 32
    assert normalize_curve_key(public) == raw
    assert normalize_curve_key(public.decode()) == raw
    assert normalize_curve_key(raw) == raw
    t = create_tenant("acme")
    assert membership_proof(t, NA, NB, public, PK_B) == membership_proof(t, NA, NB, raw, PK_B)
    for bad in (b"x" * 31, "x" * 39, "\x00" * 40, "#" * 40, 5):
        with pytest.raises(LocalProtocolError):
            normalize_curve_key(bad)


def test_tenant_tags():
    acme, beta = create_tenant("acme"), create_tenant("beta")
    tag = tenant_tag(acme, b"salt-1")
    assert len(tag) == 16 and int(tag, 16) >= 0
    assert "acme" not in tag
    assert tenant_tag(acme, b"salt-1") == tag == tenant_tag(acme, "salt-1")
    assert tenant_tag(acme, b"salt-2") != tag  # unlinkable across salts
    assert tenant_tag(create_tenant("acme"), b"salt-1") != tag  # only holders of the secret match
    assert tenant_tag(beta, b"salt-1") != tag
    tags = [tenant_tag(acme, b"s"), tenant_tag(create_tenant("gamma"), b"s"), 7, None]
    assert match_tags(tags, b"s", {"acme": acme, "beta": beta}) == {"acme"}
    assert match_tags(tags, b"s", [acme, beta]) == {"acme"}
    assert match_tags(tags, b"other-salt", [acme, beta]) == set()
    # the tag key is not the proof key nor the token key
    assert tag != hmac.new(acme._member_key, b"meshq-tag-v1\x00salt-1", hashlib.sha256).digest()[:8].hex()
    with pytest.raises(LocalProtocolError):
        tenant_tag(acme, b"")


# ---------------------------------------------------------------------------------------------
# membership handshake

UNIVERSE = {n: create_tenant(n) for n in ("t0", "t1", "t2", "t3", "t4", "t5")}


def _wire(msg):
    """Send through msgpack the way the transport would."""
    return msgpack.unpackb(msgpack.packb(msg, use_bin_type=True), raw=False)


def _run(a_tenants, b_tenants, pk_a=PK_A, pk_b=PK_B):
    a = MembershipHandshake(a_tenants, pk_a, pk_b)
    b = MembershipHandshake(b_tenants, pk_b, pk_a)
    hello = a.start()
    welcome, none = b.receive(_wire(hello), now=0)
    assert none is None and not b.done
    proof, proven_a = a.receive(_wire(welcome), now=0)
    reply, proven_b = b.receive(_wire(proof), now=0)
    assert reply is None
    assert a.done and b.done and a.proven == proven_a and b.proven == proven_b
    assert a.role == "initiator" and b.role == "responder"
    return proven_a, proven_b, (hello, welcome, proof)


def test_handshake_intersection():
    u = UNIVERSE
    proven_a, proven_b, msgs = _run([u["t0"], u["t1"], u["t2"]], {"t1": u["t1"], "t2": u["t2"], "t3": u["t3"]})
    assert proven_a == proven_b == frozenset({"t1", "t2"})
    hello, welcome, proof = msgs
    assert hello["type"] == HELLO and welcome["type"] == WELCOME and proof["type"] == PROOF
    flat = repr(msgs)
    for name in ("t0", "t1", "t2", "t3"):
        assert f"'{name}'" not in flat  # no tenant name on the wire
    assert all(len(p) == 32 for p in welcome["proofs"].values())


def test_handshake_disjoint_and_empty():
    u = UNIVERSE
    assert _run([u["t0"]], [u["t1"]])[:2] == (frozenset(), frozenset())
    assert _run([], [u["t1"]])[:2] == (frozenset(), frozenset())
    assert _run([u["t1"]], [])[:2] == (frozenset(), frozenset())


@settings(max_examples=60, deadline=None)
@given(st.sets(st.sampled_from(sorted(UNIVERSE))), st.sets(st.sampled_from(sorted(UNIVERSE))))
def test_handshake_property_proven_is_intersection(sa, sb):
    proven_a, proven_b, _ = _run([UNIVERSE[n] for n in sa], [UNIVERSE[n] for n in sb])
    assert proven_a == proven_b == frozenset(sa & sb)


def test_peer_lacking_tenant_never_proves_it():
    u = UNIVERSE
    fake_t2 = create_tenant("t2")  # knows the name, not the secret
    proven_a, proven_b, _ = _run([u["t1"], u["t2"]], [u["t1"], fake_t2])
    assert proven_a == proven_b == frozenset({"t1"})


def test_forged_proof_fails():
    u = UNIVERSE
    a = MembershipHandshake([u["t1"], u["t2"]], PK_A, PK_B)
    hello = a.start()
    # the attacker saw the tags but holds no secret: it claims every offered tenant with junk
    forged = {"type": WELCOME, "v": 1, "nonce": NB, "proofs": {tag: bytes(32) for tag in hello["tags"]}}
    with pytest.raises(AuthorizationError):
        a.receive(forged, now=0)
    assert not a.done
    with pytest.raises(RemoteProtocolError):  # dead after failure
        a.receive(forged, now=0)


def test_initiator_claiming_tenant_it_lacks_fails_at_responder():
    u = UNIVERSE
    # Mallory replays a genuine HELLO (nonce + tags) from a real member of t1, then cannot prove it.
    genuine = MembershipHandshake([u["t1"]], PK_A, PK_B).start()
    b = MembershipHandshake([u["t1"]], PK_B, PK_M)
    welcome, _ = b.receive(genuine, now=0)
    assert welcome["proofs"]  # B proved, bound to Mallory's key and nonce
    tag = next(iter(welcome["proofs"]))
    with pytest.raises(AuthorizationError):
        b.receive({"type": PROOF, "v": 1, "proofs": {tag: os.urandom(32)}}, now=0)
    # and if Mallory sends no proofs, nothing is proven
    b2 = MembershipHandshake([u["t1"]], PK_B, PK_M)
    b2.receive(genuine, now=0)
    assert b2.receive({"type": PROOF, "v": 1, "proofs": {}}, now=0) == (None, frozenset())


def test_reflected_proof_fails():
    u = UNIVERSE
    a = MembershipHandshake([u["t1"]], PK_A, PK_B)
    b = MembershipHandshake([u["t1"]], PK_B, PK_A)
    welcome, _ = b.receive(a.start(), now=0)
    # an attacker sends B's own proofs back to B as if they were A's
    with pytest.raises(AuthorizationError):
        b.receive({"type": PROOF, "v": 1, "proofs": welcome["proofs"]}, now=0)


def test_reflected_hello_fails():
    u = UNIVERSE
    a = MembershipHandshake([u["t1"]], PK_A, PK_B)
    hello = a.start()
    with pytest.raises(RemoteProtocolError):
        a.receive(hello, now=0)  # the initiator never accepts a HELLO
    # a responder that sees its own nonce echoed back refuses it
    b = MembershipHandshake([u["t1"]], PK_B, PK_A, nonce=hello["nonce"])
    with pytest.raises(RemoteProtocolError, match="nonce"):
        b.receive(hello, now=0)


def test_replayed_welcome_fails_on_a_new_link():
    u = UNIVERSE
    _, _, (hello1, welcome1, _) = _run([u["t1"]], [u["t1"]])
    a2 = MembershipHandshake([u["t1"]], PK_A, PK_B)
    hello2 = a2.start()
    # replayed verbatim: the proofs are keyed by last session's tags
    with pytest.raises(RemoteProtocolError):
        a2.receive(welcome1, now=0)
    # replayed with the keys rewritten to this session's tags: the proofs are bound to the old nonce
    a3 = MembershipHandshake([u["t1"]], PK_A, PK_B)
    hello3 = a3.start()
    old_proof = next(iter(welcome1["proofs"].values()))
    replay = dict(welcome1, proofs={hello3["tags"][0]: old_proof})
    with pytest.raises(AuthorizationError):
        a3.receive(replay, now=0)
    assert hello2["nonce"] != hello1["nonce"]


def test_replayed_proof_fails_on_a_new_link():
    u = UNIVERSE
    a = MembershipHandshake([u["t1"]], PK_A, PK_B)
    b = MembershipHandshake([u["t1"]], PK_B, PK_A)
    hello = a.start()
    welcome, _ = b.receive(hello, now=0)
    proof, _ = a.receive(welcome, now=0)
    # the same HELLO and PROOF replayed to a fresh responder (fresh nonce) are refused
    b2 = MembershipHandshake([u["t1"]], PK_B, PK_A)
    b2.receive(hello, now=0)
    with pytest.raises(AuthorizationError):
        b2.receive(proof, now=0)


def test_man_in_the_middle_relay_fails():
    u = UNIVERSE
    # A connected to Mallory (CURVE says PK_M), B accepted Mallory (CURVE says PK_M); Mallory relays.
    a = MembershipHandshake([u["t1"]], PK_A, PK_M)
    b = MembershipHandshake([u["t1"]], PK_B, PK_M)
    welcome, _ = b.receive(a.start(), now=0)
    with pytest.raises(AuthorizationError):
        a.receive(welcome, now=0)


def test_handshake_state_errors_and_deadline():
    u = UNIVERSE
    with pytest.raises(LocalProtocolError):
        MembershipHandshake([u["t1"]], PK_A, PK_A)
    with pytest.raises(LocalProtocolError):
        MembershipHandshake([u["t1"]], PK_A, PK_B, nonce=b"short")
    a = MembershipHandshake([u["t1"]], PK_A, PK_B)
    a.start()
    with pytest.raises(LocalProtocolError):
        a.start()
    b = MembershipHandshake([u["t1"]], PK_B, PK_A)
    with pytest.raises(RemoteProtocolError):
        b.receive({"type": PROOF, "v": 1, "proofs": {}}, now=0)  # PROOF before HELLO

    slow = MembershipHandshake([u["t1"]], PK_A, PK_B, deadline=10.0)
    peer = MembershipHandshake([u["t1"]], PK_B, PK_A)
    welcome, _ = peer.receive(slow.start(), now=0)
    assert not slow.timed_out(10.0) and slow.timed_out(10.5)
    with pytest.raises(TimeoutError):
        slow.receive(welcome, now=10.5)
    assert isinstance(TimeoutError("x"), MeshqError)


def test_handshake_rejects_unoffered_proof_keys():
    u = UNIVERSE
    a = MembershipHandshake([u["t1"]], PK_A, PK_B)
    a.start()
    with pytest.raises(RemoteProtocolError):
        a.receive({"type": WELCOME, "v": 1, "nonce": NB, "proofs": {"0" * 16: bytes(32)}}, now=0)


MALFORMED = [
    None, 1, "HELLO", b"x", [], {},
    {"type": HELLO},
    {"type": HELLO, "v": 2, "nonce": NB, "tags": []},
    {"type": HELLO, "v": True, "nonce": NB, "tags": []},
    {"type": HELLO, "v": 1, "nonce": b"short", "tags": []},
    {"type": HELLO, "v": 1, "nonce": b"x" * 65, "tags": []},
    {"type": HELLO, "v": 1, "nonce": "a" * 32, "tags": []},
    {"type": HELLO, "v": 1, "nonce": NB, "tags": "abc"},
    {"type": HELLO, "v": 1, "nonce": NB, "tags": [1]},
    {"type": HELLO, "v": 1, "nonce": NB, "tags": ["XYZ"]},
    {"type": HELLO, "v": 1, "nonce": NB, "tags": ["0" * 16] * 257},
    {"type": HELLO, "v": 1, "nonce": NB, "tags": [], **{f"k{i}": i for i in range(20)}},
    {"type": "other", "v": 1},
    {"type": ["x"], "v": 1},
]


@pytest.mark.parametrize("msg", MALFORMED)
def test_responder_rejects_malformed(msg):
    b = MembershipHandshake(list(UNIVERSE.values()), PK_B, PK_A)
    with pytest.raises(RemoteProtocolError):
        b.receive(msg, now=0)


@pytest.mark.parametrize(
    "msg",
    [
        {"type": WELCOME, "v": 1, "nonce": NB},
        {"type": WELCOME, "v": 1, "nonce": NB, "proofs": []},
        {"type": WELCOME, "v": 1, "nonce": NB, "proofs": {1: bytes(32)}},
        {"type": WELCOME, "v": 1, "nonce": NB, "proofs": {"0" * 16: b"short"}},
        {"type": WELCOME, "v": 1, "proofs": {}},
        {"type": PROOF, "v": 1, "proofs": {}},
    ],
)
def test_initiator_rejects_malformed(msg):
    a = MembershipHandshake(list(UNIVERSE.values()), PK_A, PK_B)
    a.start()
    with pytest.raises(RemoteProtocolError):
        a.receive(msg, now=0)


_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20),
    st.binary(max_size=70),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=8), inner, max_size=5)),
    max_leaves=20,
)
_structured = st.fixed_dictionaries(
    {"type": st.sampled_from([HELLO, WELCOME, PROOF, "x"]), "v": st.sampled_from([1, 2, True, "1"])},
    optional={
        "nonce": st.one_of(st.binary(min_size=0, max_size=80), _scalars),
        "tags": st.one_of(st.lists(st.one_of(st.text("0123456789abcdef", min_size=16, max_size=16), _scalars),
                                   max_size=4), _values),
        "proofs": st.one_of(st.dictionaries(st.one_of(st.text("0123456789abcdef", min_size=16, max_size=16),
                                                      st.text(max_size=4)), st.binary(min_size=30, max_size=34),
                                            max_size=3), _values),
    },
)


@settings(max_examples=400, deadline=None)
@given(st.one_of(_values, _structured), st.sampled_from(["fresh", "initiator", "responder"]))
def test_handshake_garbage_only_raises_remote_protocol_error(msg, stage):
    u = UNIVERSE
    h = MembershipHandshake([u["t1"], u["t2"]], PK_A, PK_B)
    if stage == "initiator":
        h.start()
    elif stage == "responder":
        other = MembershipHandshake([u["t1"]], PK_B, PK_A)
        h.receive(other.start(), now=0)
    try:
        h.receive(msg, now=0)
    except RemoteProtocolError:
        assert not h.done
    # garbage cannot carry a valid proof, so if it was accepted, nothing got proven
    if h.done:
        assert h.proven == frozenset()


# ---------------------------------------------------------------------------------------------
# token bucket


def test_rate_limiter_basic():
    rl = RateLimiter(rate=10, burst=5)
    assert all(rl.try_acquire(1, 100.0) for _ in range(5))
    assert not rl.try_acquire(1, 100.0)
    assert rl.delay_for(1, 100.0) == pytest.approx(0.1)
    assert rl.delay_for(3, 100.0) == pytest.approx(0.3)
    assert not rl.try_acquire(1, 100.05)
    assert rl.try_acquire(1, 100.1)
    assert rl.delay_for(0, 100.1) == 0.0 and rl.try_acquire(0, 100.1)
    # refill is capped at burst
    assert rl.available(1000.0) == 5
    assert rl.try_acquire(5, 1000.0) and not rl.try_acquire(1, 1000.0)


def test_rate_limiter_edges():
    rl = RateLimiter(rate=2.5)
    assert rl.burst == 3
    assert rl.try_acquire(3, 0) and rl.delay_for(3, 0) == pytest.approx(1.2)
    with pytest.raises(QuotaExceeded):
        rl.try_acquire(4, 0)  # can never be granted
    with pytest.raises(QuotaExceeded):
        rl.delay_for(4, 0)
    with pytest.raises(ValueError):
        rl.try_acquire(-1, 0)
    # a clock going backwards adds nothing
    assert rl.available(-50.0) == 0 and rl.available(0.4) == pytest.approx(1.0)
    for bad in ((0, 1), (-1, 1), (float("inf"), 1), (1, 0), (1, 0.5), (1, float("nan"))):
        with pytest.raises(ConfigError):
            RateLimiter(*bad)
    # fractional tokens
    frac = RateLimiter(rate=1, burst=1)
    assert frac.try_acquire(0.5, 0) and frac.try_acquire(0.5, 0) and not frac.try_acquire(0.5, 0)


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(0.01, 1e6), burst=st.integers(1, 1000), start=st.floats(-1e6, 1e9),
    steps=st.lists(st.tuples(st.floats(0, 10), st.integers(1, 1000)), min_size=1, max_size=30),
)
def test_rate_limiter_property(rate, burst, start, steps):
    rl = RateLimiter(rate, burst)
    now, granted, slack = start, 0, 0.0
    for dt, n in steps:
        now += dt
        n = min(n, burst)
        d = rl.delay_for(n, now)
        assert d >= 0
        if d == 0:
            assert rl.try_acquire(n, now)
        else:
            assert not rl.try_acquire(n, now)
            now += d
            assert rl.try_acquire(n, now)  # waiting exactly delay_for is enough
        granted += n
        slack += 1e-6 + rate * 8 * math.ulp(now)  # float time resolution at this magnitude
        # never more than the bucket plus what the rate allows over elapsed time
        assert granted <= burst + rate * (now - start) + slack


# ---------------------------------------------------------------------------------------------
# rate-limited logging


@pytest.fixture
def log(caplog):
    caplog.set_level(logging.DEBUG, logger="meshq.test.rl")
    return RateLimitedLog(logging.getLogger("meshq.test.rl"), interval=10.0)


def test_log_suppression(log, caplog):
    assert log.warning("peer-x", "bad frame from %s", "x", now=0.0)
    for t in (1.0, 2.0, 9.99):
        assert not log.warning("peer-x", "bad frame from %s", "x", now=t)
    assert log.suppressed("peer-x") == 3
    assert log.warning("peer-y", "bad frame from %s", "y", now=5.0)  # other keys are independent
    assert log.warning("peer-x", "bad frame from %s", "x2", now=10.0)
    assert log.suppressed("peer-x") == 0
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == [
        "bad frame from x",
        "bad frame from y",
        "bad frame from x2 (3 similar messages suppressed)",
    ]
    assert all(r.levelno == logging.WARNING for r in caplog.records)
    assert [r.meshq_suppressed for r in caplog.records] == [0, 0, 3]
    assert caplog.records[0].filename == os.path.basename(__file__)  # points at the caller
    # nothing suppressed since: plain message again
    assert log.warning("peer-x", "again", now=25.0)
    assert caplog.records[-1].getMessage() == "again"


def test_log_levels_and_formatting(log, caplog):
    log.error("k1", "disk 100% full", now=0)  # literal % without args stays as is
    log.info("k2", "%d items", 3, now=0)
    log.debug("k3", "%d items", "not a number", now=0)  # a bad format never raises
    log.log(logging.CRITICAL, "k4", "boom", now=0)
    msgs = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert msgs[0] == (logging.ERROR, "disk 100% full")
    assert msgs[1] == (logging.INFO, "3 items")
    assert msgs[2][0] == logging.DEBUG and "not a number" in msgs[2][1]
    assert msgs[3] == (logging.CRITICAL, "boom")
    log.error("k1", "disk %s full", "100%", now=1)
    log.error("k1", "x", now=20)
    assert caplog.records[-1].getMessage() == "x (1 similar messages suppressed)"


def test_log_disabled_level_and_default_clock(caplog):
    logger = logging.getLogger("meshq.test.rl2")
    caplog.set_level(logging.WARNING, logger="meshq.test.rl2")
    rl = RateLimitedLog(logger, interval=60)
    assert not rl.debug("k", "hidden")
    assert rl.warning("k", "shown")  # now=None uses a monotonic clock
    assert not rl.warning("k", "shown")
    assert [r.getMessage() for r in caplog.records] == ["shown"]


def test_log_keys_are_bounded(caplog):
    logger = logging.getLogger("meshq.test.rl3")
    caplog.set_level(logging.WARNING, logger="meshq.test.rl3")
    rl = RateLimitedLog(logger, interval=10, max_keys=100)
    for i in range(10_000):
        rl.warning(("peer", i), "hostile %d", i, now=0)
    assert len(rl._entries) == 100
    with pytest.raises(ConfigError):
        RateLimitedLog(logger, interval=-1)
