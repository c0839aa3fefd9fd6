"""The `meshq` command, in the style of the `nats` CLI.

Listings take `--json`; streams print JSON Lines; connection flags have environment twins
(`--agent` / MESHQ_AGENT); no secret is ever taken from the command line.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import functools
import json
import logging
import sys
import time

import click

from . import __version__
from ._client import DEFAULT_DATA_DIR, connect
from ._errors import MeshqError, TimeoutError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

_agent_flag = click.option(
    "--agent", envvar="MESHQ_AGENT", default=None, metavar="ENDPOINT",
    help="The local agent: an endpoint (ipc://…, tcp://…) or its data dir [env: MESHQ_AGENT].",
)
_creds_flag = click.option(
    "--creds", envvar="MESHQ_CREDS", default=None, metavar="FILE", type=click.Path(dir_okay=False),
    help="Client credentials file from `meshq tenant token` [env: MESHQ_CREDS].",
)


def agent_option(fn):
    """The connection flags every client command takes: --agent and --creds."""
    return _agent_flag(_creds_flag(fn))


def fail(message: str, code: int = 1) -> None:
    click.echo(f"meshq: error: {message}", err=True)
    sys.exit(code)


def client_command(fn):
    """Run an async command body, turning meshq errors into plain messages and exit code 1."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return asyncio.run(fn(*args, **kwargs))
        except KeyboardInterrupt:
            sys.exit(130)
        except (MeshqError, OSError) as e:
            fail(str(e))
    return wrapper


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="meshq")
def main() -> None:
    """meshq: a brokerless, multi-tenant message mesh."""


# ---------------------------------------------------------------- agent
@main.command(context_settings=CONTEXT)
@click.option("--data-dir", envvar="MESHQ_DATA_DIR", default=DEFAULT_DATA_DIR, show_default=True,
              type=click.Path(file_okay=False), help="Where the agent keeps its store and socket [env: MESHQ_DATA_DIR].")
@click.option("--listen", default="tcp://127.0.0.1:7400", show_default=True, metavar="tcp://IP:PORT",
              help="Peer endpoint to bind.")
@click.option("--peer", "peers", multiple=True, metavar="tcp://IP:PORT", help="Link to this agent (repeatable).")
@click.option("--name", default=None, help="A human-friendly agent name (default: host name + id).")
@click.option("--client-endpoint", default=None, metavar="ENDPOINT",
              help="Where local clients connect (default: ipc://DATA_DIR/agent.sock).")
@click.option("--advertise", default=None, metavar="tcp://IP:PORT", help="The endpoint other agents should dial.")
@click.option("--durability", type=click.Choice(["fsync", "none"]), default="fsync", show_default=True,
              help="fsync: a publish returns after its group commit is on disk.")
@click.option("--interface", "interfaces", multiple=True, metavar="IP",
              help="Run mDNS on this interface address (repeatable; default: all interfaces, or none when "
                   "--listen is loopback).")
@click.option("--seed", "seeds", multiple=True, metavar="tcp://HOST:PORT",
              help="Link to this agent and learn its peers (repeatable): for hosts multicast cannot reach.")
@click.option("--no-mdns", is_flag=True, help="Do not use mDNS (seeds and --peer only).")
@click.option("--tenant-file", "tenant_files", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Serve this tenant (a file from `meshq tenant create`; repeatable).")
@click.option("--open/--no-open", "open_tenant", default=None,
              help="Serve the credential-less 'default' tenant (default: only when no --tenant-file).")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A TOML file with any of these options (flags given here win).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.pass_context
def agent(ctx, data_dir, listen, peers, name, client_endpoint, advertise, durability, interfaces, seeds, no_mdns,
          tenant_files, open_tenant, config_file, log_level) -> None:
    """Run an agent in the foreground (logs to stderr; SIGTERM/SIGINT stop it cleanly)."""
    from ._agent import Agent, AgentConfig

    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = dict(data_dir=data_dir, listen=listen, peers=list(peers), name=name, client_endpoint=client_endpoint,
                   advertise=advertise, durability=durability, interfaces=list(interfaces) or None,
                   seeds=list(seeds), mdns=not no_mdns, tenant_files=list(tenant_files), open_tenant=open_tenant)
    if config_file:
        options = _merge_config(ctx, config_file, options)
    config = AgentConfig(**options)
    try:
        node = Agent(config)
    except (MeshqError, OSError) as e:
        fail(str(e))
    node.install_signal_handlers()

    def ready(a) -> None:
        click.echo(f"meshq agent {a.name} ({a.agent_id}) ready: client {a.sockets.client_endpoint} "
                   f"peer {a.advertise}")
        sys.stdout.flush()

    node.run(on_ready=ready)


def _merge_config(ctx: click.Context, path: str, options: dict) -> dict:
    """Options from a TOML config file, overridden by flags given on the command line."""
    import tomllib
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise click.BadParameter(f"cannot read {path}: {e}", param_hint="--config")
    names = {k.replace("-", "_"): v for k, v in data.get("agent", data).items()}
    if "peer" in names:
        names["peers"] = names.pop("peer")
    for single, plural in (("tenant_file", "tenant_files"), ("seed", "seeds"), ("interface", "interfaces")):
        if single in names:
            names[plural] = names.pop(single)
    unknown = set(names) - set(options)
    if unknown:
        raise click.BadParameter(f"unknown option(s) in {path}: {', '.join(sorted(unknown))}", param_hint="--config")
    merged = dict(options)
    for key, value in names.items():
        if ctx.get_parameter_source(key) in (None, click.core.ParameterSource.DEFAULT):
            merged[key] = value
    return merged


# ---------------------------------------------------------------- pub
def _parse_headers(pairs) -> dict | None:
    headers = {}
    for pair in pairs:
        key, sep, value = pair.partition(":")
        if not sep or not key:
            raise click.UsageError(f"header {pair!r} is not KEY:VALUE")
        headers[key.strip()] = value.strip()
    return headers or None


@main.command(context_settings=CONTEXT)
@click.argument("subject")
@click.argument("body", required=False)
@click.option("-H", "--header", "headers", multiple=True, metavar="KEY:VALUE", help="Add a header (repeatable).")
@click.option("--count", default=1, show_default=True, type=click.IntRange(min=1),
              help="Publish N messages; {i} in the body becomes 1..N.")
@click.option("--ttl", type=float, default=None, help="Expire the message(s) after this many seconds.")
@click.option("--delay", type=click.FloatRange(min=0), default=None,
              help="Do not deliver before this many seconds from now (kept durably by the agent).")
@agent_option
@client_command
async def pub(subject, body, headers, count, ttl, delay, agent, creds) -> None:
    """Publish BODY (or stdin) to SUBJECT; exits 0 once the local agent has it durably."""
    hdrs = _parse_headers(headers)
    if body is None:
        data = sys.stdin.buffer.read()
        template = None
    else:
        template = body
        data = body.encode()
    async with await connect(agent, creds=creds, name="meshq-pub") as mq:
        start = time.perf_counter()
        templated = template is not None and "{i}" in template
        pending: collections.deque = collections.deque()
        for i in range(1, count + 1):
            payload = template.replace("{i}", str(i)).encode() if templated else data
            pending.append(await mq.publish_async(subject, payload, headers=hdrs, ttl=ttl, delay=delay))
            if len(pending) > 20_000:          # confirmations arrive in order: check the oldest
                for _ in range(10_000):
                    await pending.popleft()
        await mq.flush()
        for ack in pending:
            await ack                            # raises the first refusal (AuthorizationError, QuotaExceeded…)
        secs = time.perf_counter() - start
    click.echo(f"Published {count} message{'s' if count != 1 else ''} to {subject!r} in {secs:.3f} s "
               f"({count / secs if secs > 0 else 0:,.0f} msgs/s)", err=True)


# ---------------------------------------------------------------- sub
def message_json(msg) -> dict:
    """The JSON Lines shape of a message (data as text, or base64 when not UTF-8)."""
    out = {"id": msg.id.hex(), "subject": msg.subject, "headers": dict(msg.headers), **_data_json(msg.data)}
    out["redelivered"] = msg.redelivered
    return out


def _data_json(data: bytes) -> dict:
    """A body for JSON: {"data": text}, or {"data": base64, "encoding": "base64"} when not UTF-8."""
    try:
        return {"data": data.decode("utf-8")}
    except UnicodeDecodeError:
        return {"data": base64.b64encode(data).decode(), "encoding": "base64"}


@main.command(context_settings=CONTEXT)
@click.argument("subject")
@click.option("--group", default=None, help="Join this queue group (one member gets each message).")
@click.option("--durable", default=None, metavar="NAME",
              help="Durable subscription: it outlives this command; its messages wait while nobody is attached.")
@click.option("--ack-wait", type=click.FloatRange(min=0.05), default=None, metavar="SECONDS",
              help="Redeliver a message not acked within this time (default 30).")
@click.option("--max-deliver", type=click.IntRange(min=1), default=None, metavar="N",
              help="After N failed deliveries the message goes to the dead-letter store.")
@click.option("--filter", "filter_", default=None, metavar="EXPR",
              help="Only messages whose headers match, e.g. 'region=eu,priority>=5' (docs/filters.md).")
@click.option("--count", type=click.IntRange(min=1), default=None, help="Exit 0 after N messages.")
@click.option("--timeout", type=float, default=None, help="Give up after SECONDS (exit 1 if --count not reached).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@agent_option
@client_command
async def sub(subject, group, durable, ack_wait, max_deliver, filter_, count, timeout, as_json, agent, creds) -> None:
    """Subscribe to SUBJECT (wildcards * and >) and print messages; each is acked after printing."""
    deadline = None if timeout is None else time.monotonic() + timeout
    received = 0
    out = sys.stdout
    async with await connect(agent, creds=creds, name="meshq-sub") as mq:
        subscription = await mq.subscribe(subject, group=group, durable=durable, ack_wait=ack_wait,
                                          max_deliver=max_deliver, filter=filter_, manual_ack=True)
        while count is None or received < count:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            try:
                msg = await subscription.next_msg(timeout=left)
            except TimeoutError:
                break
            received += 1
            if as_json:
                out.write(json.dumps(message_json(msg), ensure_ascii=False) + "\n")
            else:
                hdrs = "".join(f"\n  {k}: {v}" for k, v in msg.headers.items())
                text = msg.data.decode("utf-8", "replace")
                out.write(f"[#{received}] {msg.subject}{' (redelivered)' if msg.redelivered else ''}{hdrs}\n{text}\n")
            out.flush()
            await msg.ack()
    if count is not None and received < count:
        click.echo(f"meshq: timed out after {received} of {count} messages", err=True)
        sys.exit(1)


# ---------------------------------------------------------------- status
@main.command(context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Print the raw status as JSON.")
@agent_option
@client_command
async def status(as_json, agent, creds) -> None:
    """Show the local agent: name, endpoints, peers, outbox depth and counters."""
    async with await connect(agent, creds=creds, name="meshq-status") as mq:
        st = await mq.status()
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    click.echo(f"agent     {st['name']} ({st['id']})")
    for k, v in st["endpoints"].items():
        click.echo(f"{k:<9} {v}")
    click.echo(f"outbox    {st['outbox']['messages']} messages in {st['outbox']['streams']} streams")
    click.echo(f"clients   {st['clients']}, subscriptions {st['subscriptions']}")
    click.echo(f"peers     {len(st['peers'])}")
    for p in st["peers"]:
        click.echo(f"  {p['name'] or '?':<20} {p['id']:<18} {p['state']:<10} {p['endpoint']}")
    if st["counters"]:
        click.echo("counters")
        for k, v in st["counters"].items():
            click.echo(f"  {k:<28} {v}")


# ---------------------------------------------------------------- dead letters
@main.group(context_settings=CONTEXT)
def dlq() -> None:
    """The local agent's dead letters for your tenant: list, show, requeue, purge."""


def _ms(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) + f".{ms % 1000:03d}" if ms else "-"


@dlq.command("list", context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="One JSON array of dead letters.")
@agent_option
@client_command
async def dlq_list(as_json, agent, creds) -> None:
    """List dead letters (id, subject, attempts, last reason)."""
    async with await connect(agent, creds=creds, name="meshq-dlq") as mq:
        rows = await mq.dlq_list()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no dead letters")
    for r in rows:
        click.echo(f"{r['id']}  {r['subject']:<30} attempts {r['attempts']:<3} {r['last_reason']:<9} dead {_ms(r['dead_ms'])}")


@dlq.command("show", context_settings=CONTEXT)
@click.argument("msg_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON (data as text, or base64).")
@agent_option
@client_command
async def dlq_show(msg_id, as_json, agent, creds) -> None:
    """Show one dead letter: headers, body and its delivery attempts (agent, time, reason)."""
    async with await connect(agent, creds=creds, name="meshq-dlq") as mq:
        d = await mq.dlq_show(msg_id.lower())
    d.update(_data_json(d["data"]))
    if as_json:
        click.echo(json.dumps(d, indent=2, ensure_ascii=False))
        return
    click.echo(f"id        {d['id']}\nsubject   {d['subject']}\nsub       {d['subscription']}\n"
               f"dead      {_ms(d['dead_ms'])}\nheaders   {json.dumps(d['headers'])}\ndata      {d['data']}")
    click.echo("attempts")
    for a in d["history"]:
        click.echo(f"  {_ms(a['at_ms'])}  {a['agent']:<24} {a['reason']}")


@dlq.command("requeue", context_settings=CONTEXT)
@click.argument("msg_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@agent_option
@client_command
async def dlq_requeue(msg_id, as_json, agent, creds) -> None:
    """Republish a dead letter to its subject (under a new id) and remove it from the store."""
    async with await connect(agent, creds=creds, name="meshq-dlq") as mq:
        r = await mq.dlq_requeue(msg_id.lower())
    click.echo(json.dumps(r) if as_json else f"requeued {r['id']} to {r['subject']!r} as {r['new_id']}")


@dlq.command("purge", context_settings=CONTEXT)
@click.argument("msg_id", metavar="[ID]", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@agent_option
@client_command
async def dlq_purge(msg_id, as_json, agent, creds) -> None:
    """Delete one dead letter, or every one of your tenant's when no ID is given."""
    async with await connect(agent, creds=creds, name="meshq-dlq") as mq:
        n = await mq.dlq_purge(msg_id.lower() if msg_id else None)
    click.echo(json.dumps({"purged": n}) if as_json else f"purged {n} dead letter{'s' if n != 1 else ''}")

# ---------------------------------------------------------------- request/reply and directory
@main.command(context_settings=CONTEXT)
@click.argument("subject")
@click.argument("body", required=False)
@click.option("-H", "--header", "headers", multiple=True, metavar="KEY:VALUE", help="Add a header (repeatable).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True, max=3600), default=5.0, show_default=True,
              help="Seconds to wait for the reply.")
@click.option("--json", "as_json", is_flag=True, help="Print the reply as one JSON object.")
@agent_option
@client_command
async def req(subject, body, headers, timeout, as_json, agent, creds) -> None:
    """Send a request with BODY (or stdin) to SUBJECT and print the reply (exit 1: no responders or timeout)."""
    data = sys.stdin.buffer.read() if body is None else body.encode()
    async with await connect(agent, creds=creds, name="meshq-req") as mq:
        start = time.perf_counter()
        msg = await mq.request(subject, data, timeout=timeout, headers=_parse_headers(headers))
        secs = time.perf_counter() - start
    if as_json:
        out = message_json(msg)
        out.pop("redelivered", None)
        out["rtt_ms"] = round(secs * 1000, 3)
        click.echo(json.dumps(out, ensure_ascii=False))
    else:
        click.echo(f"Received reply on {msg.subject!r} in {secs * 1000:.1f} ms", err=True)
        sys.stdout.buffer.write(msg.data + (b"" if msg.data.endswith(b"\n") else b"\n"))
        sys.stdout.flush()


@main.command(context_settings=CONTEXT)
@click.argument("subject")
@click.option("--group", default=None, help="Responder group (default _responders): one member answers each request.")
@click.option("--count", type=click.IntRange(min=1), default=None, help="Exit 0 after answering N requests.")
@click.option("--command", "cmd", default=None, metavar="CMD",
              help="Run CMD (shell) per request: request body on stdin, its stdout is the reply.")
@click.option("--echo", is_flag=True, help="Reply with the request body (the default without --command/--body).")
@click.option("--body", default=None, help="Reply with this text; {i} becomes the request number.")
@click.option("--json", "as_json", is_flag=True, help="Log each request as a JSON line on stdout.")
@agent_option
@client_command
async def reply(subject, group, count, cmd, echo, body, as_json, agent, creds) -> None:
    """Answer requests on SUBJECT (wildcards allowed) until interrupted or --count is reached."""
    if sum(x is not None and x is not False for x in (cmd, body, echo or None)) > 1:
        fail("give at most one of --command, --echo and --body", 2)
    answered = 0
    async with await connect(agent, creds=creds, name="meshq-reply") as mq:
        server = await mq.serve(subject, group=group)
        click.echo(f"Serving requests on {subject!r} (group {server.group})", err=True)
        async for msg in server:
            answered += 1
            if cmd is not None:
                proc = await asyncio.create_subprocess_shell(cmd, stdin=asyncio.subprocess.PIPE,
                                                             stdout=asyncio.subprocess.PIPE)
                data, _ = await proc.communicate(msg.data)
            elif body is not None:
                data = body.replace("{i}", str(answered)).encode()
            else:
                data = msg.data
            await msg.respond(data)
            if as_json:
                click.echo(json.dumps({**message_json(msg), "n": answered}, ensure_ascii=False))
            else:
                click.echo(f"[#{answered}] request on {msg.subject} ({len(msg.data)} bytes) answered", err=True)
            if count is not None and answered >= count:
                break
        await asyncio.sleep(0.05)   # let the last reply leave before the goodbye


@main.command("dir", context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Print the directory as JSON.")
@agent_option
@client_command
async def dir_(as_json, agent, creds) -> None:
    """Show the tenant's directory as the local agent sees it: every agent's subscriptions and services."""
    async with await connect(agent, creds=creds, name="meshq-dir") as mq:
        listing = await mq.directory()
    if as_json:
        click.echo(json.dumps(listing, indent=2))
        return
    click.echo(f"tenant {listing['tenant']} as seen by {listing.get('name', '')} ({listing['agent']})")
    names = {e["origin"]: e.get("name") for e in listing["entries"] if e["kind"] == "agent"}
    for e in listing["entries"]:
        if e["kind"] == "agent":
            continue
        who = f"{names.get(e['origin']) or '?'} ({e['origin']})"
        opts = " ".join(f"{k}={e[k]}" for k in ("group", "durable", "filter") if e.get(k))
        click.echo(f"  {e['kind']:<4} {e['subject']:<30} {opts:<40} {who} {e['state']}")


# ---------------------------------------------------------------- tenant
@main.group(context_settings=CONTEXT)
def tenant() -> None:
    """Create tenants and issue client credentials (secrets go to 0600 files, never to the terminal)."""


@tenant.command("create", context_settings=CONTEXT)
@click.argument("name")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Where to write the tenant file (mode 0600).")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
@click.option("--max-message-bytes", type=click.IntRange(min=1), default=None)
@click.option("--max-outbox-messages", type=click.IntRange(min=1), default=None)
@click.option("--max-outbox-bytes", type=click.IntRange(min=1), default=None)
@click.option("--publish-rate", type=click.FloatRange(min=0, min_open=True), default=None, help="msgs/s per agent.")
@click.option("--publish-burst", type=click.IntRange(min=1), default=None)
@click.option("--retention-seconds", type=click.FloatRange(min=0, min_open=True), default=None)
@click.option("--retention-bytes", type=click.IntRange(min=1), default=None)
def tenant_create(name, out, force, **quotas) -> None:
    """Create tenant NAME with a fresh secret and optional quotas; give the file to its agents."""
    from ._auth import Quotas, create_tenant, write_tenant_file
    try:
        q = Quotas.from_dict({k: v for k, v in quotas.items() if v is not None})
        write_tenant_file(out, create_tenant(name, q), force=force)
    except FileExistsError:
        fail(f"{out} exists; pass --force to overwrite it")
    except (MeshqError, OSError) as e:
        fail(str(e))
    click.echo(f"created tenant {name!r} in {out} (keep it secret: agents load it with --tenant-file)", err=True)


@tenant.command("token", context_settings=CONTEXT)
@click.argument("tenant_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--allow-pub", multiple=True, metavar="PATTERN", help="Subjects it may publish to (default: all).")
@click.option("--allow-sub", multiple=True, metavar="PATTERN", help="Subjects it may subscribe to (default: all).")
@click.option("--name", default="", help="A name for the holder (shown in logs).")
@click.option("--expires", type=click.FloatRange(min=0, min_open=True), default=None, metavar="SECONDS",
              help="Valid for this many seconds from now.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Where to write the credentials (mode 0600).")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def tenant_token(tenant_file, allow_pub, allow_sub, name, expires, out, force) -> None:
    """Issue client credentials for the tenant in TENANT_FILE, limited to subject patterns."""
    from ._auth import issue_token, load_tenant_file, write_token_file
    try:
        secret = load_tenant_file(tenant_file)
        token = issue_token(secret, allow_pub=tuple(allow_pub) or (">",), allow_sub=tuple(allow_sub) or (">",),
                            name=name, expires=None if expires is None else time.time() + expires)
        write_token_file(out, token, force=force)
    except FileExistsError:
        fail(f"{out} exists; pass --force to overwrite it")
    except (MeshqError, OSError) as e:
        fail(str(e))
    click.echo(f"wrote credentials for tenant {secret.name!r} to {out}", err=True)


@tenant.command("show", context_settings=CONTEXT)
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
def tenant_show(file, as_json) -> None:
    """Describe a tenant or credentials file (never its secret)."""
    from ._auth import load_tenant_file, load_token_file, peek_token
    try:
        try:
            t = load_tenant_file(file)
            info = {"kind": "tenant", "tenant": t.name, "quotas": t.quotas.to_dict(omit_defaults=False)}
        except MeshqError:
            creds = load_token_file(file)
            tok = peek_token(creds.token)
            info = {"kind": "credentials", "tenant": tok.tenant, "name": tok.name, "allow_pub": list(tok.allow_pub),
                    "allow_sub": list(tok.allow_sub), "expires": tok.expires}
    except (MeshqError, OSError) as e:
        fail(str(e))
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            click.echo(f"{k:<10} {v}")


# ---------------------------------------------------------------- peers
def _ago(v) -> str:
    return "-" if v is None else f"{v:.1f}s ago"


@main.command(context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array, one object per agent.")
@agent_option
@client_command
async def peers(as_json, agent, creds) -> None:
    """Every agent the local agent knows: state (alive/suspect/dead), last heard, RTT, how it was found."""
    async with await connect(agent, creds=creds, name="meshq-peers") as mq:
        st = await mq.status()
    rows = st.get("mesh", [])
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'ID':<18} {'NAME':<20} {'STATE':<10} {'LAST HEARD':<12} {'RTT':>9}  {'FOUND BY':<12} ENDPOINTS")
    for r in rows:
        rtt = "-" if r["rtt_ms"] is None else f"{r['rtt_ms']:.1f}ms"
        click.echo(f"{r['id'] or '?':<18} {(r['name'] or '')[:20]:<20} {r['state']:<10} {_ago(r['last_heard_s']):<12} "
                   f"{rtt:>9}  {','.join(r['found_by']):<12} {' '.join(r['endpoints'])}")
    d = st.get("discovery", {})
    if d:
        ifs = d["interfaces"] if isinstance(d["interfaces"], str) else ", ".join(d["interfaces"]) or "-"
        click.echo(f"\nmDNS {d['mdns']} on {ifs}: {d['reason']}" + (f" ({d['error']})" if d.get("error") else ""))


# ---------------------------------------------------------------- doctor
@main.command(context_settings=CONTEXT)
@click.option("--interface", "interfaces", multiple=True, metavar="IP", help="Check mDNS on this address (repeatable).")
@click.option("--seed", "seeds", multiple=True, metavar="tcp://HOST:PORT", help="Check that this seed answers.")
@click.option("--listen", default="tcp://0.0.0.0:7400", show_default=True, metavar="tcp://IP:PORT",
              help="The agent's --listen (decides the default interfaces).")
@click.option("--no-mdns", is_flag=True, help="The agent runs without mDNS.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def doctor(interfaces, seeds, listen, no_mdns, as_json) -> None:
    """Check discovery: which interfaces mDNS uses and why, multicast, seeds; a fix for each failure.

    Exits 0 when every check passed, 1 otherwise.
    """
    from ._doctor import run_doctor
    report = run_doctor(list(interfaces) or None, list(seeds), listen, mdns=not no_mdns)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        ifs = ", ".join(report.interfaces) or "none"
        click.echo(f"mDNS interfaces: {ifs}\n  why: {report.reason}")
        for c in report.checks:
            click.echo(f"[{'ok' if c.ok else 'FAIL'}] {c.name}: {c.detail}")
            if c.fix:
                click.echo(f"       fix: {c.fix}")
        click.echo("all checks passed" if report.ok else "some checks failed")
    sys.exit(0 if report.ok else 1)


# ---------------------------------------------------------------- demo
@main.command(context_settings=CONTEXT)
@click.option("--count", default=10_000, show_default=True, type=click.IntRange(min=1))
@click.option("--size", default=100, show_default=True, type=click.IntRange(min=0), help="Body size in bytes.")
def demo(count, size) -> None:
    """Two agents on loopback, a publish/subscribe round trip of COUNT messages, a summary."""
    from ._demo import run_demo
    try:
        sys.exit(run_demo(count, size))
    except (MeshqError, OSError) as e:
        fail(str(e))


# ---------------------------------------------------------------- bench
@main.command(context_settings=CONTEXT)
@click.argument("workload", type=click.Choice(["pubsub", "queue", "fanout", "request"]), default="pubsub")
@click.option("--count", default=100_000, show_default=True, type=click.IntRange(min=1), help="Messages per publisher.")
@click.option("--duration", type=click.FloatRange(min=0.1), default=None,
              help="Publish for this many seconds instead of a count.")
@click.option("--size", default=100, show_default=True, type=click.IntRange(min=8), help="Body bytes.")
@click.option("--consumers", default=3, show_default=True, type=click.IntRange(min=1),
              help="Consumers (queue, fanout), each behind its own agent; pubsub has one.")
@click.option("--publishers", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--rate", type=click.FloatRange(min=1), default=None,
              help="Pace each publisher at this many msgs/s (latency of a loaded, not saturated, mesh).")
@click.option("--durability", type=click.Choice(["fsync", "none"]), default="fsync", show_default=True)
@click.option("--api", type=click.Choice(["batch", "single"]), default="batch", show_default=True,
              help="batch: publish_many/next_batch; single: publish_async/next_msg per message.")
@click.option("--agent", "pub_agent", default=None,
              help="Use a running mesh: the publishers' agent (endpoint or data dir) instead of starting agents.")
@click.option("--sub-agent", "sub_agents", multiple=True,
              help="With --agent: a consumers' agent (repeatable, cycled over the consumers; default: --agent).")
@click.option("--concurrency", default=100, show_default=True, type=click.IntRange(min=1),
              help="request: requests in flight at once.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def bench(workload, count, duration, size, consumers, publishers, rate, durability, api, pub_agent, sub_agents,
          concurrency, as_json) -> None:
    """Measure a workload end to end on agents it starts on loopback, or on a running mesh (--agent).

    Prints msgs/s, MB/s and latency percentiles from the publish call to the delivery in the
    consuming process; for `request`, requests/s and the round-trip time of each request.
    """
    from ._bench import format_result, run_bench

    def show(line: str) -> None:
        sys.stderr.write("\r\033[K" + line)
        sys.stderr.flush()
    progress = show if not as_json and sys.stderr.isatty() else None
    try:
        result = run_bench(workload, None if duration else count, size, consumers, publishers, durability, rate,
                           progress=progress, duration=duration, api=api, pub_agent=pub_agent,
                           sub_agents=list(sub_agents) or None, concurrency=concurrency)
    except (MeshqError, OSError, RuntimeError, ValueError) as e:
        fail(str(e))
    click.echo(json.dumps(result.as_dict()) if as_json else format_result(result))
    if not result.ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
