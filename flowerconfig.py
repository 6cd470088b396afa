"""Flower's settings for ``celery -A worker flower``: Flower reads ``flowerconfig.py`` from
its working directory, after the FLOWER_* environment and before its command line.

The pump's tasks carry the whole purchase as their one argument, purchase id first:
show the args column so the task list says which purchase each task is for (Flower's
default list has no args). FLOWER_TASKS_COLUMNS still overrides it."""

import os

tasks_columns = os.environ.get("FLOWER_TASKS_COLUMNS") or (
    "name,uuid,state,args,received,runtime,worker"
)
