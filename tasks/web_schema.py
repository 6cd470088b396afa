"""OpenAPI description of the web app's bodies.

The purchase body is ``tasks.purchase.Purchase``, the model that also validates it: the
schema says exactly what is accepted. The answers are described by the models below."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field, create_model

from .purchase import Purchase
from .targets import TARGETS


class Receipt(BaseModel):
    purchase_id: str
    lsn: int = Field(description="Position of the purchase in the write-ahead log.")


_STATES: dict[str, Any] = {t: (Literal["pending", "done"], ...) for t in TARGETS}
PurchaseState: type[BaseModel] = create_model("PurchaseState", purchase_id=(str, ...), **_STATES)


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
    201: {
        "model": Receipt,
        "description": "Durable: the purchase is in the log (again: the "
        "first answer, nothing appended).",
    },
    408: _problem("Body not received in time; nothing appended."),
    409: _problem("Another purchase was recorded under this purchase_id; nothing appended."),
    413: _problem("Body over the size limit; nothing appended."),
    415: _problem("Body is not application/json; nothing appended."),
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
            body = Purchase.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(body.pop("$defs", {}))
            schemas["Purchase"] = body
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
