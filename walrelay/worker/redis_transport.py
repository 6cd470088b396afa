"""A fix to kombu's Redis channel, so that a worker no longer exits when the broker dies.

Celery 5.7 handles a lost broker connection in ``Consumer.on_connection_error_after_connected``
by first calling ``connection.collect()`` and then ``connection.close()``. ``collect`` closes
the channel and then detaches the transport (``transport.client = None``). When Redis is
already gone, that first channel close can stop half-way with a connection error (kombu
ignores it) before the channel is marked closed. The second close then runs the channel's
``restore_unacked`` for the tasks the worker holds, which builds a new Redis client from
``transport.client``: ``AttributeError: 'NoneType' object has no attribute 'hostname'``.
That is no connection error, so ``ignore_errors`` lets it through, Celery logs
"Unrecoverable error" and the worker exits 1 (5 exits in 12 Redis kills under load, seen
here with Celery 5.7.0, kombu 5.7.0, redis-py 8.1.0).

``Channel._connparams`` here raises redis-py's ``ConnectionError`` instead when the
transport is detached: a connection error kombu already expects and ignores there, so the
consumer goes on to reconnect like after any other broker loss. Nothing is lost by not
restoring: the held tasks' messages stay in Redis's unacked set (restored after the
visibility timeout if that Redis kept them) and the pump re-sends whatever is unconfirmed.

``use_fixed_channel`` puts it on one connection's transport: the worker consumer's
(walrelay.worker.consumer.Consumer.ensure_connected), where the crash happens, and only
for plain Redis: the fix was written for, and is tested on, kombu's Redis channel. The
transport class and the broker URL stay kombu's, so what reads the URL (Flower's broker
page, the worker's banner) sees ``redis://`` as before.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis
from redis.exceptions import ConnectionError as RedisConnectionError


class Channel(kombu_redis.Channel):
    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        if self.connection.client is None:
            raise RedisConnectionError("the connection was closed: its transport is detached")
        # (kombu's type stubs leave this private method out)
        params: dict[str, Any] = super()._connparams(asynchronous=asynchronous)  # type: ignore[misc]
        return params


def use_fixed_channel(conn: Any) -> bool:
    """Make ``conn`` (a kombu Connection not yet connected) open its channels as
    ``Channel``; True if it did (plain ``redis://``/``rediss://``), False for any other
    transport. Subclasses are left alone: ``Channel`` would replace their own channel
    class (Sentinel's would then send its commands to the sentinels)."""
    transport = conn.transport
    if type(transport) is not kombu_redis.Transport:
        return False
    # kombu's virtual transport creates every channel as ``self.Channel(connection)``:
    # an attribute on this one transport object, the class itself is left alone.
    transport.Channel = Channel
    return True
