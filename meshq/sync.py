"""A blocking facade over the asyncio client, for services without an event loop.

    with meshq.sync.connect() as mq:
        mq.publish("orders.new", b"...")
        for msg in mq.subscribe("orders.>"):
            ...
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Iterator, Mapping

from . import _client
from ._client import Message
from ._errors import QuotaExceeded, TimeoutError

__all__ = ["connect", "Client", "Subscription", "Message"]


class _LoopThread:
    """An event loop on a daemon thread, owned by one sync Client."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="meshq-sync", daemon=True)
        self._thread.start()

    def run(self, coro, timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


class Subscription:
    """A blocking subscription: iterate it, or call `next(timeout=)`."""

    def __init__(self, owner: "Client", sub: _client.Subscription) -> None:
        self._owner, self._sub = owner, sub

    def next(self, timeout: float | None = None) -> Message:
        """The next message; TimeoutError after `timeout` seconds."""
        return self._owner._run(self._sub.next_msg(timeout))

    def __iter__(self) -> Iterator[Message]:
        while True:
            try:
                yield self.next()
            except StopAsyncIteration:
                return

    def ack(self, msg: Message) -> None:
        self._owner._run(msg.ack())

    def nack(self, msg: Message, delay: float = 0.0) -> None:
        self._owner._run(msg.nack(delay))

    def in_progress(self, msg: Message) -> None:
        """Restart the ack wait of `msg` (still working on it)."""
        self._owner._run(msg.in_progress())

    def unsubscribe(self, delete: bool = False) -> None:
        self._owner._run(self._sub.unsubscribe(delete))

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc) -> None:
        self.unsubscribe()


class Client:
    """A blocking connection to the local agent."""

    def __init__(self, agent: str | None = None, *, creds: str | None = None, name: str = "", timeout: float = 5.0) -> None:
        self._lt = _LoopThread()
        try:
            self._client: _client.Client = self._lt.run(_client.connect(agent, creds=creds, name=name, timeout=timeout))
        except BaseException:
            self._lt.stop()
            raise

    def _run(self, coro, timeout: float | None = None) -> Any:
        return self._lt.run(coro, timeout)

    def publish(self, subject: str, data: bytes = b"", *, headers: Mapping[str, str] | None = None,
                ttl: float | None = None, block: float | None = 30.0, delay: float | None = None,
                not_before: float | None = None) -> bytes:
        """Publish; returns the message id once durable.  Over a rate quota it waits (backpressure)
        up to `block` seconds before raising QuotaExceeded (`block=None` or 0: raise at once)."""
        deadline = time.monotonic() + (block or 0)
        while True:
            try:
                return self._run(self._client.publish(subject, data, headers=headers, ttl=ttl, delay=delay,
                                                      not_before=not_before))
            except QuotaExceeded as e:
                wait = e.retry_after
                if not block or wait is None or time.monotonic() + wait > deadline:
                    raise
                time.sleep(max(wait, 0.001))

    def publish_many(self, messages, *, timeout: float | None = None) -> int:
        """Publish (subject, data) pairs in batches; returns once all are durable."""
        async def go() -> int:
            n = 0
            for subject, data in messages:
                await self._client.publish_async(subject, data)
                n += 1
            await self._client.flush(timeout)
            return n
        return self._run(go())

    def subscribe(self, subject: str, *, group: str | None = None, manual_ack: bool = False,
                  **options: Any) -> Subscription:
        """Subscribe (options as `meshq.Client.subscribe`: durable=, filter=, ack_wait=, max_deliver=)."""
        async def go():
            return await self._client.subscribe(subject, group=group, manual_ack=manual_ack, **options)
        return Subscription(self, self._run(go()))

    def dlq_list(self) -> list[dict]:
        return self._run(self._client.dlq_list())

    def dlq_show(self, msg_id: str) -> dict:
        return self._run(self._client.dlq_show(msg_id))

    def dlq_requeue(self, msg_id: str) -> dict:
        return self._run(self._client.dlq_requeue(msg_id))

    def dlq_purge(self, msg_id: str | None = None) -> int:
        return self._run(self._client.dlq_purge(msg_id))

    def serve(self, subject: str, *, group: str | None = None) -> Subscription:
        """Serve requests on `subject`; answer each with `respond(msg, data)`."""
        async def go():
            return await self._client.serve(subject, group=group)
        return Subscription(self, self._run(go()))

    def respond(self, msg: Message, data: bytes = b"", *, headers: Mapping[str, str] | None = None) -> None:
        """Answer request `msg`."""
        self._run(msg.respond(data, headers=headers))

    def request(self, subject: str, data: bytes = b"", *, timeout: float = 5.0,
                headers: Mapping[str, str] | None = None) -> Message:
        """Send a request and return the reply (NoRespondersError, TimeoutError)."""
        return self._run(self._client.request(subject, data, timeout=timeout, headers=headers))

    def status(self) -> dict:
        return self._run(self._client.status())

    def directory(self) -> dict:
        """The tenant's directory as the local agent sees it."""
        return self._run(self._client.directory())

    def close(self) -> None:
        """Close the connection and stop the loop thread; idempotent."""
        if self._lt.loop.is_closed():
            return
        try:
            self._run(self._client.close(), 10)
        finally:
            self._lt.stop()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def connect(agent: str | None = None, *, creds: str | None = None, name: str = "", timeout: float = 5.0) -> Client:
    """Connect to the local agent, blocking (see `meshq.connect`)."""
    return Client(agent, creds=creds, name=name, timeout=timeout)


del TimeoutError  # re-exported from meshq, not here
