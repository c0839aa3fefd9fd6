"""The CLI contract, driven end to end in subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

import meshq

MESHQ = [sys.executable, "-m", "meshq"]


def run(*args, env=None, input=None, timeout=30):
    return subprocess.run([*MESHQ, *args], capture_output=True, timeout=timeout, input=input,
                          env={**os.environ, **(env or {})})


def wait_for_subscriptions(agent_endpoint: str, want: int = 1, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc = run("status", "--json", "--agent", agent_endpoint)
        if proc.returncode == 0:
            st = json.loads(proc.stdout)
            if sum(p["subscriptions"] for p in st["peers"] if p["state"] == "alive") >= want:
                return
        time.sleep(0.1)
    raise AssertionError("subscription did not reach the publishing agent")


def test_version_help_and_usage_errors():
    v = run("--version")
    assert v.returncode == 0 and meshq.__version__ in v.stdout.decode()
    h = run("--help")
    assert h.returncode == 0
    for cmd in ("agent", "pub", "sub", "status"):
        assert cmd in h.stdout.decode()
    assert run("pub").returncode == 2
    assert run("no-such-command").returncode == 2
    assert run("sub", "x", "--count", "zero").returncode == 2


def test_client_without_agent_fails_in_plain_english(workdir):
    proc = run("status", "--agent", f"ipc://{workdir}/nobody.sock", timeout=30)
    assert proc.returncode == 1
    err = proc.stderr.decode()
    assert "no meshq agent answered" in err and "Traceback" not in err


@pytest.mark.timeout(90)
def test_pub_sub_status_round_trip(agents):
    a = agents.start("a")
    b = agents.start("b", peers=[a.peer_endpoint])
    assert a.client_endpoint in a.ready_line
    sub = subprocess.Popen([*MESHQ, "sub", "cli.>", "--count", "4", "--timeout", "30", "--json"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           env={**os.environ, "MESHQ_AGENT": b.client_endpoint})
    try:
        wait_for_subscriptions(a.client_endpoint)
        p = run("pub", "cli.text", "hello {i}", "--count", "3", "-H", "k:v", "--agent", a.client_endpoint)
        assert p.returncode == 0, p.stderr
        assert b"3 messages" in p.stderr and b"msgs/s" in p.stderr
        p = run("pub", "cli.bin", "--agent", a.client_endpoint, input=b"\xff\x00\xfe")
        assert p.returncode == 0, p.stderr
        out, err = sub.communicate(timeout=30)
    finally:
        sub.kill()
    assert sub.returncode == 0, err
    lines = [json.loads(line) for line in out.decode().splitlines()]
    assert [m["data"] for m in lines[:3]] == ["hello 1", "hello 2", "hello 3"]
    for m in lines:
        assert set(m) >= {"id", "subject", "headers", "data", "redelivered"}
        assert m["redelivered"] is False
    assert lines[0]["headers"] == {"k": "v"} and lines[0]["subject"] == "cli.text"
    assert lines[3]["encoding"] == "base64" and lines[3]["data"] == "/wD+"

    st = run("status", "--json", "--agent", a.client_endpoint)
    assert st.returncode == 0
    status = json.loads(st.stdout)
    assert status["name"] == "a" and status["endpoints"]["client"] == a.client_endpoint
    assert status["counters"]["published"] == 4
    assert status["peers"][0]["name"] == "b"
    human = run("status", "--agent", a.client_endpoint)
    assert human.returncode == 0 and b"outbox" in human.stdout


def test_sub_times_out_with_exit_1(agents):
    a = agents.start("a")
    proc = run("sub", "nothing.here", "--count", "1", "--timeout", "0.5", "--agent", a.client_endpoint)
    assert proc.returncode == 1
    assert b"timed out" in proc.stderr


@pytest.mark.timeout(90)
def test_queue_group_members_share_the_work(agents):
    a = agents.start("a")
    b = agents.start("b", peers=[a.peer_endpoint])
    subs = [subprocess.Popen([*MESHQ, "sub", "work.>", "--group", "workers", "--json", "--timeout", "6"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**os.environ, "MESHQ_AGENT": b.client_endpoint}) for _ in range(2)]
    try:
        wait_for_subscriptions(a.client_endpoint)
        time.sleep(0.5)   # both members subscribed
        p = run("pub", "work.item", "job {i}", "--count", "200", "--agent", a.client_endpoint)
        assert p.returncode == 0
        outs = [s.communicate(timeout=30)[0].decode().splitlines() for s in subs]
    finally:
        for s in subs:
            s.kill()
    datas = [json.loads(line)["data"] for out in outs for line in out]
    assert sorted(datas) == sorted(f"job {i}" for i in range(1, 201))
    assert all(outs), "each member should get a share"


def test_tenant_files_tokens_and_agent_config(workdir, agents):
    tenant = os.path.join(workdir, "acme.tenant")
    token = os.path.join(workdir, "svc.creds")
    p = run("tenant", "create", "acme", "--out", tenant, "--publish-rate", "1000")
    assert p.returncode == 0, p.stderr
    assert os.stat(tenant).st_mode & 0o777 == 0o600
    assert run("tenant", "create", "acme", "--out", tenant).returncode == 1          # no silent overwrite
    p = run("tenant", "token", tenant, "--allow-pub", "orders.>", "--out", token)
    assert p.returncode == 0 and os.stat(token).st_mode & 0o777 == 0o600
    shown = json.loads(run("tenant", "show", token, "--json").stdout)
    assert shown == {"kind": "credentials", "tenant": "acme", "name": "", "allow_pub": ["orders.>"],
                     "allow_sub": [">"], "expires": None}
    secret = json.load(open(tenant))["secret"]
    assert secret not in run("tenant", "show", tenant).stdout.decode()
    os.chmod(tenant, 0o644)
    bad = run("tenant", "token", tenant, "--out", os.path.join(workdir, "x.creds"))
    assert bad.returncode == 1 and b"chmod 600" in bad.stderr
    os.chmod(tenant, 0o600)

    config = os.path.join(workdir, "agent.toml")
    with open(config, "w") as f:
        f.write(f'[agent]\ntenant-file = ["{tenant}"]\nname = "from-config"\ndurability = "none"\n')
    a = agents.start("cfg", extra=["--config", config])
    assert "cfg" in a.ready_line          # a flag given on the command line wins over the file
    ok = run("pub", "orders.new", "hi", "--agent", a.client_endpoint, "--creds", token)
    assert ok.returncode == 0, ok.stderr
    refused = run("pub", "billing.x", "hi", "--agent", a.client_endpoint, env={"MESHQ_CREDS": token})
    assert refused.returncode == 1 and b"not allowed to publish" in refused.stderr
    anonymous = run("status", "--agent", a.client_endpoint)
    assert anonymous.returncode == 1 and b"requires credentials" in anonymous.stderr
    st = json.loads(run("status", "--json", "--agent", a.client_endpoint, "--creds", token).stdout)
    assert st["durability"] == "none" and st["tenant"] == "acme"
