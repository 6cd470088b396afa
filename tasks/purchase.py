"""A purchase: its rules, written once. The pydantic model ``Purchase`` validates it (the
Python API and the web app), words the 422 (each error names the field) and is the
OpenAPI schema of POST /purchases (tasks.web_schema), so schema-driven clients generate
exactly what is accepted.

Text fields hold no control characters (NUL, ESC, ... C0 and C1) and are not blank;
amounts are integers exact in every JSON client (at most 2**53 - 1); currencies are
ISO 4217 codes (any case) from the iso4217 package: ISO's own table, small, and released
with each amendment (pycountry and babel carry it too, but weigh megabytes).
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

import iso4217
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

MAX_ITEMS = 100
MAX_QTY = 1_000_000
MAX_TOTAL_CENTS = 2**53 - 1  # JavaScript's Number.MAX_SAFE_INTEGER
ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"  # patterns are searched: anchored on both ends
# JSON Schema patterns are ECMA-262, whose \s is not Python's whitespace: spell out what
# str.isspace() means (a test checks every code point), and the C0/C1 controls.
PY_WHITESPACE = (
    r"\t\n\u000b\u000c\r\u001c-\u0020\u0085\u00a0\u1680\u2000-\u200a"
    r"\u2028\u2029\u202f\u205f\u3000"
)
CONTROLS = r"\u0000-\u001f\u007f-\u009f"
# No control character anywhere, and at least one character that is not whitespace.
TEXT_PATTERN = f"^[^{CONTROLS}]*[^{CONTROLS}{PY_WHITESPACE}][^{CONTROLS}]*$"
# ISO 4217 codes with minor units: currencies, not gold (XAU), tests (XTS) or "none" (XXX).
CURRENCIES = frozenset(
    code for code, e in iso4217.raw_table.items() if code and str(e.get("CcyMnrUnts")).isdigit()
)


def _any_case(code: str) -> str:
    return "".join(f"[{c.upper()}{c.lower()}]" for c in code)


CURRENCY_PATTERN = "^(?:" + "|".join(_any_case(c) for c in sorted(CURRENCIES)) + ")$"

# Said instead of pydantic's "should match pattern '...'" (the currency pattern is long).
RULES = {
    "purchase_id": "1-64 letters, digits, '-' or '_'",
    "customer": "a non-blank string without control characters",
    "sku": "a non-blank string without control characters",
    "currency": "an ISO 4217 currency code, e.g. EUR",
}


class InvalidPurchaseError(ValueError):
    """The purchase is malformed; ``field`` names the offending field. Nothing appended."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


def Text(max_length: int) -> Any:
    """Bounded text matching TEXT_PATTERN (a lone UTF-16 surrogate fails the pattern too:
    it is not text, and could not be stored as UTF-8)."""
    return Annotated[str, Field(min_length=1, max_length=max_length, pattern=TEXT_PATTERN)]


class Item(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, title="Item")

    sku: Text(64)  # type: ignore[valid-type]
    qty: int = Field(ge=1, le=MAX_QTY)


class Purchase(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, title="Purchase")

    purchase_id: str | None = Field(
        default=None,
        pattern=ID_PATTERN,
        description="Idempotency key of the purchase; generated when absent. The same id "
        "with the same purchase again answers the first receipt; with another, 409.",
    )
    customer: Text(200)  # type: ignore[valid-type]
    items: list[Item] = Field(min_length=1, max_length=MAX_ITEMS)
    total_cents: int = Field(ge=0, le=MAX_TOTAL_CENTS)
    currency: Annotated[
        str,
        Field(pattern=CURRENCY_PATTERN, description="ISO 4217 code, any case.", examples=["EUR"]),
        AfterValidator(str.upper),
    ]


def validate(purchase: object) -> dict[str, Any]:
    """The normalised purchase (JSON types, currency upper case, an id generated when
    absent), or InvalidPurchaseError naming the first bad field."""
    try:
        model = Purchase.model_validate(purchase)
    except ValidationError as exc:
        raise _invalid(exc) from None
    doc = model.model_dump()
    if doc["purchase_id"] is None:
        doc["purchase_id"] = uuid.uuid4().hex
    return doc


def _invalid(exc: ValidationError) -> InvalidPurchaseError:
    error = exc.errors(include_url=False)[0]
    field = _field(error["loc"])
    message = str(error["msg"])
    if error["type"] == "string_pattern_mismatch":
        names = [part for part in error["loc"] if isinstance(part, str)]
        message = RULES.get(names[-1] if names else "", message)
    elif error["type"] == "model_type":
        message = "must be a JSON object"
    return InvalidPurchaseError(field, message)


def _field(loc: tuple[int | str, ...]) -> str:
    """("items", 0, "qty") -> "items[0].qty"; () -> "purchase" (the document itself)."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "purchase"
