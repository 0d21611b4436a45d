"""Ctrl-C (SIGINT) and SIGTERM during `prep run`: stop, say one line, exit 130 / 143.

Without this, a Ctrl-C in a single-job run unwinds through Beam, which logs it as an ERROR and
wraps it (`RuntimeError: KeyboardInterrupt [while running 'Mask/...']`), and the launcher's
worker processes print their own tracebacks: about 900 lines, exit 1, and nothing says that a
rerun resumes. Within `interruptible()`, the first signal:

1. is remembered, and the process's stderr (file descriptor 2, which the workers inherit too)
   goes to /dev/null: what unwinds after it prints nothing;
2. stops every process this one started (SDK workers of `--workers N`, a chunked run's pool,
   their children) with SIGKILL: exactly a preemption, which a rerun already resumes from
   (every file is written to a temporary name and renamed; nothing half-written has a final
   name, so nothing is mistaken for done);
3. raises KeyboardInterrupt in the main thread, whatever Beam then wraps it into.

When the block unwinds, the one line goes to the real stderr and `Interrupted` (exit code 128 +
the signal's number) replaces whatever exception came out; descriptor 2 stays on /dev/null
until the process exits. Later signals are ignored from the first one on, for good: the process
is leaving. The CLI's `main()` ends it with `os._exit(exit_code)`, without the interpreter's
shutdown: a KeyboardInterrupt raised by the handler inside code that CPython runs through
`PyRun_String` marks the interpreter as "ended by an unhandled KeyboardInterrupt", and a normal
exit would then kill the process with SIGINT (exit -2) whatever `sys.exit` said (seen once in
CI, under load); the shutdown would also wait on Beam's non-daemon threads.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import Iterator, Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)
MESSAGE = "interrupted: rerun the same command to resume"


class Interrupted(Exception):
    """A run stopped by a signal; `exit_code` is the shell's 128 + signal number."""

    def __init__(self, signum: int):
        super().__init__(MESSAGE)
        self.signum = signum
        self.exit_code = 128 + signum


def descendants(pid: Optional[int] = None) -> list[int]:
    """Every process started by `pid` (default: this one), children before their children,
    read from /proc (Linux); [] where /proc cannot tell."""
    root = os.getpid() if pid is None else pid
    parent_of: dict[int, int] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode("ascii", "replace")
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses, so split after the last ')'
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 1:
            parent_of[int(entry)] = int(fields[1])
    found, frontier = [], [root]
    while frontier:
        children = [p for p, parent in parent_of.items() if parent in frontier and p != root]
        found.extend(children)
        frontier = children
    return found


def _kill_descendants() -> None:
    for pid in descendants():
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def interruptible() -> Iterator[dict]:
    """SIGINT/SIGTERM inside the block become `Interrupted` (see the module docstring). Only in
    the main thread (signal handlers can be set nowhere else); elsewhere it does nothing."""
    import threading

    state: dict = {"signum": None, "stderr": None}
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def handler(signum, frame):
        if state["signum"] is not None:
            return  # already stopping
        state["signum"] = signum
        with contextlib.suppress(OSError):
            state["stderr"] = os.dup(2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
        _kill_descendants()
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    leaving = False
    try:
        yield state
    except BaseException:
        if state["signum"] is None:
            raise
        leaving = True
        for s in SIGNALS:  # the process is on its way out: a second Ctrl-C must not turn into a traceback
            signal.signal(s, signal.SIG_IGN)
        _kill_descendants()  # any started while it unwound
        _say(state, MESSAGE)
        raise Interrupted(state["signum"]) from None
    finally:
        if not leaving:  # the block ended (a signal after its work was done included): handlers as before
            for s, old in previous.items():
                signal.signal(s, old)
    if state["stderr"] is not None:  # a signal after the block's work was done: carry on
        os.dup2(state["stderr"], 2)
        os.close(state["stderr"])


def _say(state: dict, text: str) -> None:
    """The one line, on the real stderr. Descriptor 2 stays on /dev/null until the process
    exits: what runs at its shutdown (multiprocessing's resource tracker warns about the
    killed pool's semaphores, atexit handlers) prints nothing."""
    fd = state["stderr"]
    if fd is None:
        print(text, file=sys.stderr, flush=True)
        return
    with contextlib.suppress(OSError):
        os.write(fd, (text + "\n").encode("utf-8"))
        os.close(fd)
    state["stderr"] = None
