"""Celery sub-commands that an application defines itself.

Celery finds sub-commands only through ``celery.commands`` entry points, which it loads
before ``-A`` names the app, so a project that is not installed (run from its checkout,
as most Celery projects are) cannot register one. This module fills the gap: any name
imported from it is a command that, once Celery has loaded the app, runs the click
command the app registered under that name with ``Relay.add_command``::

    [project.entry-points."celery.commands"]
    ledger = "walrelay.commands.app:ledger"

    relay.add_command(ledger_command)      # in the app's module
"""

from __future__ import annotations

from typing import Any

import click

from ..relay import Relay


def delegate(name: str) -> click.Command:
    """A command named ``name`` that runs the app's own command of that name."""

    @click.command(
        name=name,
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
        add_help_option=False,
        help=f"The app's own '{name}' command (see the app's documentation).",
    )
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    @click.pass_context
    def command(ctx: click.Context, args: tuple[str, ...]) -> None:
        app: Any = ctx.obj.app
        target = Relay.of(app).commands.get(name)
        if target is None:
            raise click.UsageError(f"the app {app.main or app!r} defines no '{name}' command")
        target.main(list(args), prog_name=ctx.command_path, obj=ctx.obj, standalone_mode=False)

    return command


def __getattr__(name: str) -> click.Command:
    if name.startswith("_"):
        raise AttributeError(name)
    return delegate(name)
