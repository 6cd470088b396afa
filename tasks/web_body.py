"""How POST /purchases reads its body: JSON in UTF-8, nothing else.

Refused (a 4xx, nothing appended): a media type other than ``application/json`` (415),
bytes that are not UTF-8 (a UTF-16 or UTF-32 body too: ``json.loads`` would guess its
way through those), a byte order mark, duplicate keys, NaN and Infinity, nesting past
the parser's depth, and strings that are not Unicode text (lone surrogates)."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

from .purchase import InvalidPurchaseError


def is_json(content_type: str | None) -> bool:
    """``application/json``, with no parameter but ``charset=utf-8``. Form and text types
    are what a cross-site form may post without a CORS preflight; another charset is not
    what we decode."""
    if not content_type:
        return False
    media, *params = (part.strip().lower() for part in content_type.split(";"))
    return media == "application/json" and all(
        p.replace(" ", "") in ("charset=utf-8", 'charset="utf-8"', "") for p in params
    )


def parse_body(raw: bytes) -> Any:
    """The JSON document in ``raw``, or InvalidPurchaseError naming "body" (or the key)."""
    try:
        text = raw.decode("utf-8")  # strict
    except UnicodeDecodeError as exc:
        raise InvalidPurchaseError("body", f"not UTF-8: {exc}") from None
    try:
        doc = json.loads(
            text,
            parse_constant=_reject_constant,
            parse_float=_json_number,
            object_pairs_hook=_unique_keys,
        )
    except InvalidPurchaseError:
        raise
    except RecursionError:
        raise InvalidPurchaseError("body", "JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError (a BOM too), int digit limit
        raise InvalidPurchaseError("body", f"not valid JSON: {exc}") from None
    bad = _lone_surrogate_at(doc)
    if bad is not None:
        # Such strings cannot be encoded as UTF-8: the log's record could not hold them.
        raise InvalidPurchaseError(bad, "string holds an unpaired UTF-16 surrogate")
    return doc


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object; a key given twice is refused (parsers disagree on which one wins)."""
    doc: dict[str, Any] = {}
    for key, value in pairs:
        if key in doc:
            raise InvalidPurchaseError(_shown(key), "duplicate key")
        doc[key] = value
    return doc


def _json_number(literal: str) -> int | float:
    """JSON has one number type: ``2.0`` and ``2e0`` are the integer 2 (JSON Schema agrees,
    and JavaScript clients cannot tell them apart), so they are validated as ints. Exact
    (Decimal), and only within 2**53, where every client's doubles are exact too."""
    value = float(literal)
    if value.is_integer() and abs(value) <= 2**53:
        exact = Decimal(literal)
        if exact == exact.to_integral_value():
            return int(exact)
    return value


def _lone_surrogate_at(doc: Any) -> str | None:
    """Path of the first string or key that is not valid Unicode text, else None.

    Iterative: the document may be nested as deep as the JSON parser allows."""
    todo: list[tuple[str, Any]] = [("", doc)]
    while todo:
        path, value = todo.pop()
        if isinstance(value, str) and not _encodable(value):
            return path or "body"
        if isinstance(value, dict):
            for key, item in value.items():
                if not _encodable(key):
                    return f"{path}.{_shown(key)}" if path else _shown(key)
                todo.append((f"{path}.{key}" if path else key, item))
        elif isinstance(value, list):
            todo.extend((f"{path}[{i}]", item) for i, item in enumerate(value))
    return None


def _shown(key: str) -> str:
    """A key as it can be written back in a JSON answer (surrogates escaped)."""
    return key.encode("utf-8", "backslashreplace").decode()


def _encodable(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
