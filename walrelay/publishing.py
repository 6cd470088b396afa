"""Publishing a batch so that a bad message is never taken for a broker outage.

A batch refused (``MessageRejectedError``, or any error the publisher did not classify)
is published again one message at a time, unless the publisher said which messages it
refused. A message refused alone while others pass is the message's fault: a failed
attempt for that task. A broker refusing every message proves nothing against any of
them. ``BrokerUnavailableError`` passes through: that is an outage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .broker import Publisher, TaskMessage
from .errors import BrokerUnavailableError, MessageRejectedError


@dataclass
class Outcome:
    accepted: int = 0  # messages published
    refused: dict[int, str] = field(default_factory=dict)  # position -> why
    proven: bool = False  # the refusals are the messages' own fault


def publish(publisher: Publisher, messages: Sequence[TaskMessage]) -> Outcome:
    try:
        publisher.publish(messages)
    except BrokerUnavailableError:
        raise
    except Exception as exc:  # refused, or a publisher bug: find the culprits
        return _isolate(publisher, messages, exc)
    return Outcome(accepted=len(messages))


def _isolate(publisher: Publisher, messages: Sequence[TaskMessage], exc: Exception) -> Outcome:
    out = Outcome()
    known = exc.rejected if isinstance(exc, MessageRejectedError) else {}
    if known:
        out.refused = {j: why for j, why in known.items() if 0 <= j < len(messages)}
        out.accepted = len(messages) - len(out.refused)  # published by the failed call
    else:
        for j, msg in enumerate(messages):
            try:
                publisher.publish([msg])
            except BrokerUnavailableError:
                raise
            except Exception as alone:
                out.refused[j] = f"{type(alone).__name__}: {alone}"
            else:
                out.accepted += 1
    out.proven = out.accepted > 0 or (len(messages) == 1 and isinstance(exc, MessageRejectedError))
    return out
