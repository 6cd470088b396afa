"""``celery -A worker ledger [--json]``: what the demo warehouse and finance recorded."""

from __future__ import annotations

import json
import os

import click
from celery.bin.base import CeleryCommand
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from .app import settings_of
from .ledger import Ledger, sqlite_file
from .targets import TARGETS


@click.command(cls=CeleryCommand)
@click.option("--json", "as_json", is_flag=True, help='{"warehouse": {id: deliveries}, ...}')
@click.pass_context
def ledger(ctx: click.Context, as_json: bool) -> None:
    """Show every purchase's effects and how often each task arrived."""
    url = settings_of(ctx.obj.app).ledger_url
    missing = _missing_sqlite_file(url)
    snap: dict[str, dict[str, int]] = {target: {} for target in TARGETS}
    if missing is not None:  # a reading command creates no database (a mistyped path)
        click.echo(f"no ledger at {missing}: nothing recorded there yet", err=True)
    else:
        try:
            book = Ledger(url)
            try:
                snap = book.snapshot()
            finally:
                book.close()
        except (SQLAlchemyError, ValueError, ImportError, OSError) as exc:
            why = f"cannot read the ledger at {_shown(url)}: {_why(exc)}"
            raise click.ClickException(why) from None
    if as_json:
        click.echo(json.dumps(snap, sort_keys=True))
        return
    for target, rows in snap.items():
        extra = sum(n - 1 for n in rows.values())
        click.echo(f"{target}: {len(rows)} purchases, {extra} duplicate deliveries absorbed")
    targets = list(snap)
    click.echo("purchase_id\t" + "\t".join(targets))
    for pid in sorted({p for rows in snap.values() for p in rows}):
        click.echo(pid + "\t" + "\t".join(str(snap[t].get(pid, 0)) for t in targets))


def _missing_sqlite_file(url: str) -> str | None:
    """The path of a SQLite ledger whose file does not exist, else None."""
    try:
        path = sqlite_file(url)
    except (ArgumentError, ValueError):
        return None  # reported by Ledger() as any bad URL
    return None if path is None or os.path.exists(path) else path


def _shown(url: str) -> str:
    """The URL without its password."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return "LEDGER_URL (not a database URL)"


def _why(exc: BaseException) -> str:
    """The driver's own first line (SQLAlchemy's adds the statement and a link)."""
    cause = getattr(exc, "orig", None) or exc
    lines = str(cause).strip().splitlines()
    return lines[0] if lines else type(cause).__name__
