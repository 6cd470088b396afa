"""The one supervisor of the local tooling: processes started (``spawn``, or a
``Processes`` set with numbered logs), waited for until a health check or a ready file
says they are ready (``Proc.wait_ready``), stopped by PID (TERM, then KILL, then what is
left of the process group), and looked at through /proc (children, state, whether
blocked in fsync) to kill one at a chosen moment. The demo, chaos, the tests and the
benchmarks all start their processes through it (``tools.roles`` knows the pipeline's).

Linux only (/proc), like the rest of the local tooling.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STOP_TIMEOUT = 15.0  # seconds a process gets to exit after SIGTERM before SIGKILL
START_TIMEOUT = 60.0  # seconds a process gets to be ready
# Where a process started by ``Processes`` may say it is ready: a file named by its pid
# in this directory (tools.worker_ready writes one for a Celery worker).
READY_DIR_ENV = "STACK_READY_DIR"


class StackError(RuntimeError):
    """A process of the stack did not start, or a wait timed out (the message says which
    and, for a process, where its log is). The base of every error of the tooling."""


class ProcessExited(StackError):
    """A process exited while it was waited for (the message holds the end of its log)."""


def celery_bin() -> str:
    """The ``celery`` script of this interpreter's environment."""
    beside = Path(sys.executable).with_name("celery")
    return str(beside) if beside.exists() else shutil.which("celery") or "celery"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    what: str, predicate: Callable[[], Any], timeout: float, interval: float = 0.05
) -> Any:
    """Poll ``predicate`` until it returns something truthy; StackError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise StackError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def send_signal(pid: int, sig: int) -> None:
    """``os.kill``, quiet if the process is already gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def stop_process(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT
) -> int:
    """Send ``sig`` to this one process (by PID) and reap it; SIGKILL if it lingers."""
    if proc.poll() is None:
        send_signal(proc.pid, sig)
        send_signal(proc.pid, signal.SIGCONT)  # a stopped (SIGSTOP) process cannot act on it
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            send_signal(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return int(proc.returncode)


def group_members(pgid: int) -> list[int]:
    """PIDs of the live (non-zombie) processes whose process group is ``pgid``."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None and fields[2] != "Z" and int(fields[4]) == pgid:
            found.append(int(entry.name))
    return found


def processes_mentioning(text: str) -> list[int]:
    """PIDs of live processes whose command line or environment holds ``text``, but for
    this one and its ancestors (they name it to start us): everything a stack starts has
    its work dir in WAL_DIR or on its command line, so this finds them even outside the
    process groups it knows."""
    found, needle, skip = [], text.encode(), set(ancestors())
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) in skip:
            continue
        pid = int(entry.name)
        try:
            blob = b"".join(Path(f"/proc/{pid}/{n}").read_bytes() for n in ("cmdline", "environ"))
        except OSError:
            continue
        if needle in blob and process_state(pid) not in (None, "Z"):
            found.append(pid)
    return found


def ancestors() -> list[int]:
    """This process and its ancestors up to init."""
    chain = [os.getpid()]
    while chain[-1] > 1 and len(chain) < 1000:
        fields = _stat_fields(chain[-1])
        if fields is None:
            break
        chain.append(int(fields[3]))
    return chain


def children_of(pid: int) -> list[int]:
    """PIDs of the live direct children of ``pid``."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and fields[2] != "Z" and int(fields[3]) == pid:
                found.append(int(entry.name))
    return sorted(found)


def process_state(pid: int) -> str | None:
    """The kernel's one-letter state of ``pid`` (R running, S sleeping, D disk, ...)."""
    fields = _stat_fields(pid)
    return None if fields is None else fields[2]


# fsync and fdatasync by architecture: a process blocked in one is mid-commit.
_FSYNC_CALLS = {"x86_64": {"74", "75"}, "aarch64": {"82", "83"}}.get(platform.machine(), set())


def in_fsync(pid: int) -> bool:
    """True if ``pid`` is blocked in fsync/fdatasync (or in uninterruptible disk wait)."""
    try:
        with open(f"/proc/{pid}/syscall") as f:
            call = f.read().split(" ", 1)[0].strip()
    except OSError:
        call = ""
    return call in _FSYNC_CALLS or process_state(pid) == "D"


def kill_busy(pids: list[int], wait: float = 3.0) -> str:
    """SIGKILL the first of ``pids`` caught mid-commit (in fsync/fdatasync: a producer
    mid-append, a pool process mid-task writing its effect), else after 2/3 of ``wait``
    the first seen running, else the first alive. Returns what was killed and how."""
    start = time.monotonic()
    phases: list[tuple[Callable[[int], bool], str, float]] = [
        (in_fsync, "in fsync", start + wait * 2 / 3),
        (lambda p: process_state(p) == "R", "while running", start + wait),
    ]
    for busy, how, until in phases:
        while time.monotonic() < until:
            for pid in pids:
                if busy(pid):
                    send_signal(pid, signal.SIGKILL)
                    return f"pid {pid} killed {how}"
            time.sleep(0.0005)
    for pid in pids:
        if process_state(pid) not in (None, "Z"):
            send_signal(pid, signal.SIGKILL)
            return f"pid {pid} killed idle (not seen busy in {wait:g}s)"
    raise StackError(f"no live process among {pids}")


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat split into fields; the command name (field 2) may hold spaces."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except OSError:
        return None
    head, _, tail = raw.rpartition(")")
    return [head.split(" ", 1)[0], head, *tail.split()]


@dataclass(eq=False)
class Proc:
    """One start of one role: its process, its log file, whether it leads a process
    group of its own (then its leftovers can be found and stopped), whether its end was
    asked for (``expected``: any other exit is a crash), and for a server its port."""

    role: str
    popen: subprocess.Popen[bytes]
    log: Path
    session: bool = True
    expected: bool = False
    port: int = 0  # a server's loopback port, once chosen

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    @property
    def ready_file(self) -> Path:
        """Where it says it is ready, if it does (see ``READY_DIR_ENV``)."""
        return self.log.parent / f"{self.pid}.ready"

    def wait_ready(
        self, what: str, ready: Callable[[], Any], timeout: float = START_TIMEOUT
    ) -> Any:
        """Poll ``ready`` (a health check) until truthy; ProcessExited if the process
        exits first, StackError after ``timeout``."""

        def check() -> Any:
            if not self.alive:
                tail = self.log_text()[-2000:]
                raise ProcessExited(f"{self.role} exited with {self.returncode} while waiting "
                                    f"for {what}; see {self.log}:\n{tail}")  # fmt: skip
            return ready()

        return wait_until(f"{what} (log: {self.log})", check, timeout, 0.05)

    def leftovers(self) -> list[int]:
        """Live processes of this start: itself, and with a session its group."""
        pids = [self.pid] if self.alive else []
        if self.session:
            pids += [p for p in group_members(self.pid) if p != self.pid]
        return pids

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Stop it (``sig``, then KILL) and KILL whatever is left of its group; returns
        its exit code."""
        self.expected = True
        code = stop_process(self.popen, sig, timeout)
        if self.session:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
            # A SIGKILLed process lives on until it is next scheduled: on a busy machine
            # the group can still show a member right after killpg. Gone when we return.
            deadline = time.monotonic() + 5
            while group_members(self.pid) and time.monotonic() < deadline:
                time.sleep(0.01)
        return code


def spawn(
    role: str,
    argv: list[str],
    log: Path,
    *,
    cwd: Path,
    env: Mapping[str, str],
    session: bool = True,
) -> Proc:
    """Start ``argv``, output appended to ``log``; with ``session``, in a session of its
    own (a terminal's Ctrl-C reaches only the supervisor, and the group holds whatever it
    forks, to be stopped with it)."""
    with open(log, "ab") as out:
        popen = subprocess.Popen(
            argv, cwd=cwd, env=dict(env), stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=session,
        )  # fmt: skip
    return Proc(role, popen, log, session)


class Processes:
    """The processes of one stack: each started in a session of its own, in ``cwd``, with
    the environment ``env(extra)`` plus ``STACK_READY_DIR``, its output in
    ``logdir/NN-role.log``; all stopped by PID, the front ends (``FRONT``) first."""

    FRONT = ("flower", "web")

    def __init__(
        self, logdir: Path, cwd: Path, env: Callable[[Mapping[str, str] | None], dict[str, str]]
    ) -> None:
        self.logdir = logdir
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.cwd = cwd
        self.env = env
        self.started: list[Proc] = []  # every start, in order (stopped ones too)
        self._lock = threading.Lock()

    def spawn(self, role: str, argv: list[str], env: Mapping[str, str] | None = None) -> Proc:
        with self._lock:
            log = self.logdir / f"{len(self.started) + 1:02d}-{role}.log"
            full = {**self.env(env), READY_DIR_ENV: str(self.logdir)}
            proc = spawn(role, argv, log, cwd=self.cwd, env=full)
            # A ready file of an earlier process that had this pid is not this one's (the
            # new process is still starting: it cannot have written its own yet).
            proc.ready_file.unlink(missing_ok=True)
            self.started.append(proc)
            return proc

    def stop_all(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop every process, newest first but the front ends before anything else."""
        with self._lock:
            started = list(reversed(self.started))
        order = [p for p in started if p.role in self.FRONT]
        order += [p for p in started if p.role not in self.FRONT]
        for proc in order:
            proc.stop(timeout=timeout)

    def leftovers(self) -> list[int]:
        """PIDs still alive of every start: each process and, with a session, its group."""
        return sorted({pid for proc in self.started for pid in proc.leftovers()})


def http_get(url: str) -> bytes | None:
    """The body of a GET of ``url`` that answered 200 within 2 s; None otherwise."""
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bytes(resp.read()) if resp.status == 200 else None
    except OSError:
        return None


def http_ok(url: str) -> bool:
    """True if a GET of ``url`` answers 200 within 2 s."""
    return http_get(url) is not None


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """Ignore Ctrl-C and SIGTERM meanwhile (a bounded shutdown is not to be cut short)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may change signal handlers
        return
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for sig in saved:
        signal.signal(sig, signal.SIG_IGN)
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


class Interrupted(KeyboardInterrupt):
    """SIGTERM, turned into what Ctrl-C raises, so that one ``finally`` stops the stack."""


def raise_on_sigterm() -> None:
    """From now on SIGTERM raises ``Interrupted`` and Ctrl-C ``KeyboardInterrupt`` in the
    main thread (call from there), even where SIGINT was inherited ignored (a background
    job of a script)."""

    def handler(signum: int, _frame: object) -> None:
        raise Interrupted(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
