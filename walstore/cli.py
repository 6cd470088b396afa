"""``walstore status|dump|verify|repair``: the operator's view of a log."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .errors import WalError
from .inspect import Snapshot, dump, snapshot, verify
from .repair import repair


def _warn_torn(snap: Snapshot) -> None:
    if snap.torn_tail is not None:
        print(f"warning: {snap.torn_tail}", file=sys.stderr)


def _status(args: argparse.Namespace) -> int:
    snap = snapshot(args.dir)
    _warn_torn(snap)
    if args.json:
        print(json.dumps(snap.as_dict(), sort_keys=True))
        return 0
    rows = [
        ("wal id", snap.wal_id),
        ("segments", snap.segments),
        ("bytes", snap.bytes),
        ("first LSN", snap.first_lsn),
        ("next LSN", snap.next_lsn),
        ("low water mark", snap.low_water_mark),
        ("high water mark", snap.high_water_mark),
        ("pending", snap.pending),
        ("in use", "yes (live figures)" if snap.live else "no (read from disk)"),
    ]
    for name, value in rows:
        print(f"{name:<16} {value}")
    return 0


def _dump(args: argparse.Namespace) -> int:
    snap = snapshot(args.dir)
    _warn_torn(snap)
    for lsn, payload in dump(args.dir, args.from_lsn, snap=snap):
        try:
            text: str | None = payload.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if args.json:
            doc: dict[str, object] = {"lsn": lsn}
            if text is None:
                doc["payload_hex"] = payload.hex()
                doc["payload"] = None
            else:
                doc["payload"] = text
            print(json.dumps(doc, ensure_ascii=False))
        else:
            print(f"{lsn}\t{text if text is not None else payload.hex()}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    report = verify(args.dir)
    for p in report.problems:
        print(f"{'CORRUPT' if p.fatal else 'warning'}: {p}", file=sys.stderr)
    verdict = "ok" if report.ok else "CORRUPT"
    print(f"{verdict}: {report.segments} segments, {report.records} records checked")
    return 0 if report.ok else 1


def _repair(args: argparse.Namespace) -> int:
    report = repair(args.dir)
    if not report.changed:
        print("nothing to repair")
        return 0
    kept = f"; originals kept in {report.backup_dir}" if report.backup_dir else ""
    print(f"rewrote: {', '.join(report.rewritten)}{kept}")
    if report.meta_rebuilt:
        print(f"rebuilt META from the segment headers (WAL id {report.meta_rebuilt})")
    if report.lwm_lowered:
        old, new = report.lwm_lowered
        print(
            f"low water mark lowered from {old} to {new} (the first LSN on disk): "
            f"entries {new}..{old - 1} will be delivered again"
        )
    if report.cut_bytes:
        print(f"cut {report.cut_bytes} bytes that held no whole record (a torn tail, or "
              "bytes after a sealed segment's last record)")  # fmt: skip
    for start, end in report.lost:
        print(f"LOST: LSN {start}..{end - 1} ({end - start} records) could not be recovered")
    if report.lost_tail is not None:
        print(
            f"LOST: LSN {report.lost_tail} and after: the newest segment(s) are missing and "
            "how many records they held is unknown; new records will take these LSNs again"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="walstore", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("status", help="segments, bytes, LSNs, watermarks, pending")
    p.add_argument("dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_status)
    p = sub.add_parser("dump", help="print records up to the high water mark")
    p.add_argument("dir")
    p.add_argument("--from", dest="from_lsn", type=int, default=None, metavar="LSN")
    p.add_argument("--json", action="store_true", help="one JSON object a line")
    p.set_defaults(func=_dump)
    p = sub.add_parser("verify", help="check every record; non-zero exit on corruption")
    p.add_argument("dir")
    p.set_defaults(func=_verify)
    p = sub.add_parser("repair", help="offline: salvage what verifies, cut torn tails")
    p.add_argument("dir")
    p.set_defaults(func=_repair)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except BrokenPipeError:  # an OSError: before the clause below, or it never matches
        return 0
    except (WalError, OSError) as exc:
        print(f"walstore {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
