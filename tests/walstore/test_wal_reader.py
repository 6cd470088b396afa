"""The pump's reader (``walstore.Reader``) as a state machine, against a model of the log.

Hypothesis appends records of every size (some larger than the reader's chunk), reads
batches of any size, makes a read fail with EIO, damages a record under the reader and
mends it again. After every call: what ``read`` returned is exactly the model's records
from the reader's old position, and ``next_lsn`` is the first LSN not returned; an error
is raised only at a damaged record (``next_lsn`` then names it) or for an injected EIO,
a record damaged after the reader read it into the chunk it keeps may come back intact
from there (it verified when read), and a read never loses a record (the review found a
failing chunk dropping the records parsed before it while ``next_lsn`` had moved past
them)."""

from __future__ import annotations

import errno
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import walstore.reader
from walstore import CorruptLogError, Options, Reader, SyncPolicy, Wal
from walstore.format import RECORD_HEADER_SIZE, segment_name
from walstore.fs import OsFs

pytestmark = pytest.mark.timeout(120)

SMALL_CHUNK = 512  # so that batches cross chunk boundaries and records outgrow a chunk


class FlakyFs(OsFs):
    """pread fails with EIO while ``failures`` is positive (one failure per call)."""

    def __init__(self) -> None:
        self.failures = 0

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EIO, "injected read error")
        return super().pread(fd, size, offset)


class ReaderMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.saved_chunk = walstore.reader.CHUNK
        walstore.reader.CHUNK = SMALL_CHUNK
        self.dir = Path(tempfile.mkdtemp(prefix="wal-reader-"))
        self.fs = FlakyFs()
        self.wal = Wal.open(
            self.dir,
            Options(segment_bytes=4160, sync=SyncPolicy.NONE, min_free_bytes=0, fs=self.fs),
        )
        self.payloads: list[bytes] = []
        self.where: dict[int, tuple[str, int]] = {}  # lsn -> (segment file, record offset)
        self.damaged: dict[int, int] = {}  # lsn -> offset of the flipped byte
        # Damaged on disk after the reader had read them into the chunk it keeps: it may
        # still hand them out intact from there (they verified when read), or read them
        # again from the disk and report the damage.
        self.in_copy: set[int] = set()
        self.reader: Reader | None = None
        # the error the next read raises (one of them)
        self.pending: type[Exception] | tuple[type[Exception], ...] | None = None

    def teardown(self) -> None:
        walstore.reader.CHUNK = self.saved_chunk
        if self.reader is not None:
            self.reader.close()
        self.wal.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @initialize(sizes=st.lists(st.integers(0, 1500), min_size=1, max_size=30))
    def start(self, sizes: list[int]) -> None:
        self.append(sizes)
        self.reader = self.wal.reader(0)

    @property
    def rd(self) -> Reader:
        assert self.reader is not None
        return self.reader

    @rule(sizes=st.lists(st.integers(0, 1500), min_size=1, max_size=10))
    def append(self, sizes: list[int]) -> None:
        for size in sizes:  # one by one: each record's place is known from the state
            lsn = len(self.payloads)
            payload = f"{lsn}|".encode().ljust(size, b"p")
            assert self.wal.append(payload) == lsn
            st = self.wal._shm.write_state()
            offset = st.offset - RECORD_HEADER_SIZE - len(payload)
            self.where[lsn] = (segment_name(st.active), offset)
            self.payloads.append(payload)

    @rule(max_records=st.one_of(st.integers(1, 40), st.integers(41, 5000)))
    def read(self, max_records: int) -> None:
        before = self.rd.next_lsn
        if self.pending is not None:  # the last read stopped early: its error comes now
            with pytest.raises(self.pending):
                self.rd.read(max_records)
            self.pending = None
            assert self.rd.next_lsn == before
            return
        ahead = sorted(d for d in self.damaged if d >= before)
        failures = self.fs.failures
        try:
            got = self.rd.read(max_records)
        except CorruptLogError as exc:
            # Only at a damaged record, with the reader positioned on it (past damaged
            # ones only if it still had them, read intact, in its chunk).
            at = self.rd.next_lsn
            assert at in self.damaged, (before, at, ahead, exc)
            assert all(d in self.in_copy for d in ahead if d < at), (before, at, ahead)
            assert (exc.segment, exc.offset) == self.where[at], exc
            return
        except OSError as exc:
            assert exc.errno == errno.EIO and failures > self.fs.failures
            assert self.rd.next_lsn == before  # nothing returned, nothing skipped
            return
        end = before + len(got)
        assert got == [(i, self.payloads[i]) for i in range(before, end)]
        assert self.rd.next_lsn == end
        assert all(d in self.in_copy for d in ahead if d < end), (before, end, ahead)
        if len(got) < max_records and end < len(self.payloads):
            # Stopped early, at the damage or at an injected EIO: returned what it had.
            # Both at once (the read of the damaged record failed): either comes next.
            eio, hit = failures > self.fs.failures, end in self.damaged
            assert hit or eio, (before, end, ahead)
            if hit and eio:
                self.pending = (CorruptLogError, OSError)
            else:
                self.pending = CorruptLogError if hit else OSError

    @rule(failures=st.integers(1, 3))
    def fail_reads(self, failures: int) -> None:
        self.fs.failures = failures

    @precondition(lambda self: len(self.payloads) > len(self.damaged))
    @rule(data=st.data())
    def damage(self, data: st.DataObject) -> None:
        lsn = data.draw(st.sampled_from(sorted(set(self.where) - set(self.damaged))))
        name, offset = self.where[lsn]
        at = offset + data.draw(st.integers(0, RECORD_HEADER_SIZE + len(self.payloads[lsn]) - 1))
        self._flip(name, at)
        self.damaged[lsn] = at
        rd, end = self.reader, offset + RECORD_HEADER_SIZE + len(self.payloads[lsn])
        if (
            rd is not None
            and rd._buf
            and segment_name(rd._seg) == name
            and lsn < rd._buf_hwm
            and rd._buf_pos <= offset
            and end <= rd._buf_pos + len(rd._buf)
        ):
            self.in_copy.add(lsn)

    @precondition(lambda self: bool(self.damaged))
    @rule(data=st.data())
    def mend(self, data: st.DataObject) -> None:
        lsn = data.draw(st.sampled_from(sorted(self.damaged)))
        self._flip(self.where[lsn][0], self.damaged.pop(lsn))
        self.in_copy.discard(lsn)

    def _flip(self, name: str, at: int) -> None:
        with open(self.dir / name, "r+b") as f:
            f.seek(at)
            byte = f.read(1)[0]
            f.seek(at)
            f.write(bytes([byte ^ 0x10]))

    @invariant()
    def position_is_never_past_the_end(self) -> None:
        if self.reader is not None:
            assert 0 <= self.rd.next_lsn <= len(self.payloads)


TestReader = ReaderMachine.TestCase
TestReader.settings = settings(max_examples=80, stateful_step_count=30, deadline=None)
