"""The Celery app, for ``celery -A worker ...`` (worker, pump, ledger, deadletters,
flower). Its configuration is read from the environment here, at the entry point."""

from tasks.app import get_app

app = get_app()
