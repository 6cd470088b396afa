"""OpenAPI description of the web app's bodies.

These models only document: requests are checked by ``tasks.checkout.validate`` (the one
source of truth, shared with apps that are not ours), and the models mirror its rules
so that schema-driven clients and fuzzers generate what it accepts. The patterns come
from checkout itself."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field

from . import checkout

ID_PATTERN = f"^{checkout._ID.pattern}$"  # JSON Schema patterns search: anchor them
# validate() rejects strings that are empty after str.strip(). JSON Schema patterns are
# ECMA-262, whose \s is not Python's whitespace, so spell out str.isspace() (a test checks).
PY_WHITESPACE = (
    r"\t\n\u000b\u000c\r\u001c-\u0020\u0085\u00a0\u1680\u2000-\u200a"
    r"\u2028\u2029\u202f\u205f\u3000"
)
NON_BLANK = f"[^{PY_WHITESPACE}]"


class ItemIn(BaseModel):
    model_config = ConfigDict(extra="forbid", title="Item")

    sku: str = Field(min_length=1, max_length=64, pattern=NON_BLANK)
    qty: int = Field(ge=1, le=1_000_000)


class PurchaseIn(BaseModel):
    model_config = ConfigDict(extra="forbid", title="Purchase")

    purchase_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        pattern=ID_PATTERN,
        description="Idempotency key of the purchase; generated when absent.",
    )
    customer: str = Field(min_length=1, max_length=200, pattern=NON_BLANK)
    items: list[ItemIn] = Field(min_length=1, max_length=checkout.MAX_ITEMS)
    total_cents: int = Field(ge=0)
    currency: str = Field(pattern=f"^{checkout._CURRENCY.pattern}$", description="ISO 4217 code.")


class Receipt(BaseModel):
    purchase_id: str
    lsn: int = Field(description="Position of the purchase in the write-ahead log.")


class PurchaseState(BaseModel):
    purchase_id: str
    warehouse: Literal["pending", "done"]
    finance: Literal["pending", "done"]


class Problem(BaseModel):
    detail: str
    field: str | None = Field(default=None, description="The offending field, when known.")


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    detail: str | None = None
    wal_id: str | None = None


def _problem(description: str, retry: bool = False) -> dict[str, Any]:
    doc: dict[str, Any] = {"model": Problem, "description": description}
    if retry:
        doc["headers"] = {
            "Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}
        }
    return doc


POST_RESPONSES: dict[int | str, dict[str, Any]] = {
    201: {"model": Receipt, "description": "Durable: the purchase is in the log."},
    413: _problem("Body over the size limit; nothing appended."),
    415: _problem("Body is not JSON; nothing appended."),
    422: _problem("Invalid purchase; `field` names it; nothing appended."),
    503: _problem("The log is full or failed; nothing appended. Retry later.", retry=True),
}
GET_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": PurchaseState, "description": "What the ledger recorded."},
    422: _problem("Not a valid purchase id."),
    503: _problem("The ledger cannot be read. Retry later.", retry=True),
}
HEALTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": Health, "description": "This worker can append to the log."},
    503: {"model": Health, "description": "The log cannot be opened or is poisoned."},
}
PURCHASE_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Purchase"}}},
    }
}


def install_openapi(app: FastAPI) -> None:
    """Make ``app.openapi()`` describe the purchase body the handler reads by hand."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            body = PurchaseIn.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(body.pop("$defs", {}))
            schemas["Purchase"] = body
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
