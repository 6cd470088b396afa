"""Publishing a batch so that a bad message is never taken for a broker outage.

A batch refused (``MessageRejectedError``, or any error the publisher did not classify)
is published again one message at a time, unless the publisher said which messages it
refused. A refusal is the message's own fault (a failed attempt for its task) when the
publisher says so (``MessageRejectedError`` naming it, or raised for it alone), or when
other messages passed meanwhile; an unclassified error on every message proves nothing
against any of them. ``BrokerUnavailableError`` passes through: that is an outage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .broker import Publisher, TaskMessage
from .errors import BrokerUnavailableError, MessageRejectedError


@dataclass
class Outcome:
    accepted: int = 0  # messages published
    # position -> (why, proven: the message's own fault rather than the broker's)
    refused: dict[int, tuple[str, bool]] = field(default_factory=dict)


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
        out.refused = {j: (why, True) for j, why in known.items() if 0 <= j < len(messages)}
        out.accepted = len(messages) - len(out.refused)  # published by the failed call
        return out
    if len(messages) == 1:
        out.refused[0] = (_why(exc), isinstance(exc, MessageRejectedError))
        return out
    for j, msg in enumerate(messages):
        try:
            publisher.publish([msg])
        except BrokerUnavailableError:
            raise
        except Exception as alone:
            out.refused[j] = (_why(alone), isinstance(alone, MessageRejectedError))
        else:
            out.accepted += 1
    if out.accepted:
        out.refused = {j: (why, True) for j, (why, _) in out.refused.items()}
    return out


def _why(exc: Exception) -> str:
    """Why a message published alone was refused."""
    if isinstance(exc, MessageRejectedError):
        return next(iter(exc.rejected.values()), str(exc))
    return f"{type(exc).__name__}: {exc}"
