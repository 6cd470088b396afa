"""Which tasks the pump may publish: the task names its app registers (never Celery's
own ``celery.*``) and, where configured, only some queues; never a key of the broker's
own machinery. Anything else is dead-lettered with the reason.

The web process writes the log without broker credentials; this is what keeps a record
it wrote (or anyone who can write the log) from reaching any other task or broker key.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .broker import ACK_QUEUE_PREFIX
from .record import TaskSpec

# Names of the broker's own keys and queues (kombu's Redis transport, Celery's events and
# remote control, the pump's acks): a task there would corrupt them.
RESERVED_PREFIXES = ("_kombu.", "unacked", ACK_QUEUE_PREFIX, "celeryev.", "celery.pidbox")
RESERVED_SUFFIXES = (".celery.pidbox", ".reply.celery.pidbox")
PRIORITY_SEPARATOR = "\x06\x16"  # kombu's Redis priority lists: "<queue>\x06\x16<n>"


@dataclass(frozen=True)
class TaskPolicy:
    """Refuses tasks not in ``tasks`` and, if ``queues`` is not empty, queues not in it."""

    tasks: frozenset[str]
    queues: frozenset[str] = frozenset()

    def __call__(self, spec: TaskSpec) -> str | None:
        if spec.name.startswith("celery."):
            return f"task {spec.name!r} is one of Celery's own: the pump never sends those"
        if spec.name not in self.tasks:
            return f"task {spec.name!r} is not registered in the pump's app"
        queue = spec.queue
        if self.queues and queue not in self.queues:
            return f"queue {queue!r} is not one the pump may publish to ({sorted(self.queues)})"
        if (
            not queue
            or queue.startswith(RESERVED_PREFIXES)
            or queue.endswith(RESERVED_SUFFIXES)
            or PRIORITY_SEPARATOR in queue
        ):
            return f"queue {queue!r} is reserved for the broker's own use"
        return None


def app_policy(app: Any, queues: Iterable[str] = ()) -> TaskPolicy:
    """The policy of a Celery app: its registered tasks (its ``include`` and
    autodiscovered modules imported first, as a worker does); ``queues`` if given, else
    the app's ``task_queues`` when set, else any queue that is not reserved."""
    app.loader.import_default_modules()
    allowed = set(queues) or {q.name for q in (app.conf.task_queues or ())}
    return TaskPolicy(frozenset(app.tasks), frozenset(allowed))
