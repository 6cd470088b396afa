"""Options of a log: one frozen dataclass, safe defaults, read from the environment only
by ``Options.from_env`` (called at entry points, never at import)."""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from .format import MAX_RECORD_BYTES, SEGMENT_HEADER_SIZE

# Every new segment is written whole (zeros) before it is used, and pruning frees whole
# segments: past this, a roll-over stalls appends for seconds and disk use jumps by a lot.
MAX_SEGMENT_BYTES = 1 << 30


class SyncPolicy(enum.Enum):
    """When an append is acknowledged."""

    # fdatasync before acknowledging; concurrent appenders share one flush (group commit).
    ALWAYS = "always"
    # Never fsync: for tests and benchmarks of everything but the disk. Not crash safe.
    NONE = "none"


def _parse_size(text: str, name: str) -> int:
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    raw = text.strip().lower().removesuffix("ib").removesuffix("b")
    mult = 1
    if raw and raw[-1] in units:
        mult, raw = units[raw[-1]], raw[:-1]
    try:
        value = int(raw) * mult
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a size (examples: 67108864, 64MiB)") from None
    if value <= 0:
        raise ValueError(f"{name}={text!r} must be positive")
    return value


@dataclass(frozen=True)
class Options:
    # Roll over to a new segment once the active one would grow past this many bytes.
    # Pruning works in whole segments, so this is also the granularity of disk reclaim.
    segment_bytes: int = 64 * 1024 * 1024
    # ALWAYS is the only crash-safe choice; NONE exists for tests.
    sync: SyncPolicy = SyncPolicy.ALWAYS
    # Largest payload accepted by append; a larger one raises RecordTooLargeError.
    max_record_bytes: int = 1024 * 1024
    # Cap on the log's bytes on disk (all segments); None means no cap. Past it append
    # raises LogFullError instead of filling the disk.
    max_bytes: int | None = None
    # Refuse to create a segment when the filesystem would keep less than this free.
    min_free_bytes: int = 64 * 1024 * 1024
    # Pre-fill new segments with zeros so fdatasync need not update the file size
    # (measured ~1.4x more flushes/s here); costs one segment of zero writes per roll.
    preallocate: bool = True
    # Extra keyword for tests: the file layer (walstore.fs.OsFs by default).
    fs: object | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.segment_bytes < SEGMENT_HEADER_SIZE + 4096:
            raise ValueError(f"segment_bytes={self.segment_bytes} is too small (min 4160)")
        if self.segment_bytes > MAX_SEGMENT_BYTES:
            raise ValueError(
                f"segment_bytes={self.segment_bytes} is too large (at most {MAX_SEGMENT_BYTES}, "
                "1 GiB)"
            )
        if not 0 < self.max_record_bytes <= MAX_RECORD_BYTES:
            raise ValueError(f"max_record_bytes must be in 1..{MAX_RECORD_BYTES}")
        if self.max_bytes is not None and self.max_bytes < 2 * self.segment_bytes:
            raise ValueError("max_bytes must be at least two segments (segment_bytes * 2)")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Options:
        """Options from ``WAL_SEGMENT_BYTES``, ``WAL_SYNC``, ``WAL_MAX_BYTES``."""
        env = os.environ if env is None else env
        kwargs: dict[str, object] = {}
        if env.get("WAL_SEGMENT_BYTES"):
            kwargs["segment_bytes"] = _parse_size(env["WAL_SEGMENT_BYTES"], "WAL_SEGMENT_BYTES")
        if env.get("WAL_MAX_BYTES"):
            kwargs["max_bytes"] = _parse_size(env["WAL_MAX_BYTES"], "WAL_MAX_BYTES")
        if env.get("WAL_SYNC"):
            try:
                kwargs["sync"] = SyncPolicy(env["WAL_SYNC"].strip().lower())
            except ValueError:
                raise ValueError(
                    f"WAL_SYNC={env['WAL_SYNC']!r}: use 'always' (default) or 'none'"
                ) from None
        kwargs.update(overrides)
        try:
            return replace(cls(), **kwargs)  # type: ignore[arg-type]
        except ValueError as exc:  # a size out of range: name the variables it came from
            sizes = ("WAL_SEGMENT_BYTES", "WAL_MAX_BYTES")
            given = [f"{n}={env[n]!r}" for n in sizes if env.get(n)]
            raise ValueError(f"{', '.join(given)}: {exc}" if given else str(exc)) from None
