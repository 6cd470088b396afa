"""``celery -A worker chaos ...``: the chaos command as a Celery sub-command, with the same
options as ``python -m tasks.chaos`` (see there). It runs its own local stack on embedded
defaults, so the app's broker settings are not used."""

from __future__ import annotations

import sys

import click
from celery.bin.base import CeleryCommand

from .chaos import main


@click.command(
    cls=CeleryCommand,
    add_help_option=False,  # --help goes to the chaos command's own parser
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def chaos(args: tuple[str, ...]) -> None:
    """Run the pipeline locally under a seeded schedule of faults; report (--help)."""
    sys.exit(main(list(args)))
