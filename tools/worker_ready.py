"""A Celery worker's ready file, for the local stack (``celery worker -I tools.worker_ready``,
as ``tools.roles`` starts workers).

On Celery's ``worker_ready`` signal (the consumer is running: the worker takes tasks) the
worker's main process writes ``$STACK_READY_DIR/<its pid>.ready``, atomically (walstore's
helper: temp file, fsync, rename), so the supervisor knows it is ready without reading its
log. Outside a stack (no ``STACK_READY_DIR``) it does nothing.
"""

from __future__ import annotations

import os
from typing import Any

from celery.signals import worker_ready

from tools.processes import READY_DIR_ENV
from walstore.fs import OsFs


def write_ready_file(**_: Any) -> None:
    directory = os.environ.get(READY_DIR_ENV)
    if directory:
        pid = os.getpid()
        OsFs().write_file_atomic(directory, f"{pid}.ready", f"{pid}\n".encode())


worker_ready.connect(write_ready_file, weak=False, dispatch_uid="tools.worker_ready")
