"""What a purchase asks for, defined once: each target is a Celery task, the queue it is
routed to (same name), a row in the ledger and a field of GET /purchases/{id}."""

from __future__ import annotations

WAREHOUSE = "warehouse"
FINANCE = "finance"
# In the order of a purchase's tasks in its record (targets "0" and "1").
TARGETS = (WAREHOUSE, FINANCE)
TASK_NAMES = {
    WAREHOUSE: "tasks.warehouse.reserve_stock",
    FINANCE: "tasks.finance.record_revenue",
}
QUEUES = ",".join(TARGETS)  # what a worker consumes: -Q warehouse,finance
