"""``celery -A worker deadletters [list|replay ID|purge ID]``: entries that exhausted
their attempts (kept in WAL_DIR/deadletters/)."""

from __future__ import annotations

import json
import time

import click

from walstore import Options, Wal, WalError

from ..deadletters import DeadLetterStore
from ..errors import DeadLetterNotFoundError
from ..relay import Relay


def _store(ctx: click.Context) -> tuple[DeadLetterStore, str]:
    wal_dir = Relay.of(ctx.obj.app).wal_dir
    return DeadLetterStore(wal_dir), wal_dir


@click.group(invoke_without_command=True)
@click.pass_context
def deadletters(ctx: click.Context) -> None:
    """List, replay or purge dead letters (default: list)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(list_cmd)


@deadletters.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object a line.")
@click.pass_context
def list_cmd(ctx: click.Context, as_json: bool = False) -> None:
    """Show the dead letters, oldest entry first."""
    store, _ = _store(ctx)
    letters, unreadable = store.scan()
    for letter in letters:
        if as_json:
            click.echo(json.dumps(letter.to_json(), sort_keys=True))
            continue
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(letter.dead_at))
        targets = ", ".join(
            f"{name} ({info.get('attempts')} attempts: {info.get('error')})"
            for name, info in letter.targets.items()
        )
        click.echo(f"{letter.id}\t{letter.key or '-'}\t{when}\t{targets or letter.reason}")
    for path, why in unreadable:
        click.echo(f"unreadable dead letter {path}: {why}", err=True)
    if unreadable:
        ctx.exit(1)
    if not letters and not as_json:
        click.echo("no dead letters")


@deadletters.command()
@click.argument("letter_id")
@click.pass_context
def replay(ctx: click.Context, letter_id: str) -> None:
    """Append the entry again (failed targets only) for the pump to deliver."""
    store, wal_dir = _store(ctx)
    try:
        with Wal.open(wal_dir, Options.from_env()) as wal:
            lsn = store.replay(letter_id, wal)
    except (DeadLetterNotFoundError, ValueError, WalError, OSError) as exc:
        # The log full, poisoned or damaged: the dead letter stays, to replay later.
        raise click.ClickException(str(exc)) from None
    click.echo(f"dead letter {letter_id} replayed as LSN {lsn}")


@deadletters.command()
@click.argument("letter_id")
@click.pass_context
def purge(ctx: click.Context, letter_id: str) -> None:
    """Delete a dead letter for good."""
    store, _ = _store(ctx)
    try:
        store.remove(letter_id)
    except (DeadLetterNotFoundError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"dead letter {letter_id} purged")
