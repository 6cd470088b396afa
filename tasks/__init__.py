"""Celery side of the product: purchases in, the pump, the workers, the ledger.

Imports walstore; walstore never imports this package."""
