"""The Celery app, for ``celery -A worker ...`` (worker, pump, ledger, deadletters,
flower). Its configuration is read from the environment here, at the entry point."""

from tasks.app import get_app

try:
    app = get_app()
except ValueError as exc:  # a bad setting: say which, not Celery's import traceback
    raise SystemExit(f"Error: {exc}") from None
