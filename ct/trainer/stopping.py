"""Stopping cleanly on SIGTERM (`docker stop`, a Jenkins abort) and SIGINT (Ctrl-C).

While `handling_signals()` is active, either signal raises `Stopped` in the main thread at once,
unless a `deferred()` block is writing results: then at that block's end, so that the files a
block writes (a checkpoint and the lines that go with it) are all new or all old. An epoch cut
short is simply lost; the rerun continues from the last checkpoint. `train.py` turns `Stopped`
into one line on stderr and exit status 128 + the signal (143 for SIGTERM, 130 for SIGINT).

For tests only (unset in use): `CT_TEST_SIGNAL_AT=SIGNAME@POINT` makes the process send itself
SIGNAME the first time it reaches a point (`at`) whose description starts with POINT, e.g.
`SIGKILL@after epoch 2/4` (a kill -9 just after epoch 2's checkpoint) or `SIGTERM@during epoch 3/4`.
A test that read the log and then signalled raced the next epoch; this lands on the same epoch on
every machine.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

SIGNALS = (signal.SIGTERM, signal.SIGINT)
TEST_SIGNAL_ENV = "CT_TEST_SIGNAL_AT"


class Stopped(BaseException):
    """A stop request, raised where no write is half done.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` on its way up (the one
    that reports a corrupt checkpoint, say) mistakes it for an error.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


@dataclass
class _State:
    pending: int | None = None  # the signal received, once one has been
    depth: int = 0  # deferred() blocks now running (they nest)
    finishing: bool = False  # results are being published: a stop would only waste them
    doing: str = "while starting up"
    kept: str = "any earlier checkpoint is kept"
    test_signal_sent: bool = False  # CT_TEST_SIGNAL_AT fires once per process


_state = _State()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    # A repeated signal is ignored: the first one's Stopped is already on its way up, and raising
    # again could cut short the clean-up (temp-file removal) it passes through.
    if _state.pending is not None or _state.finishing:
        return
    _state.pending = signum
    if _state.depth == 0:
        raise Stopped(signum)


@contextmanager
def handling_signals() -> Iterator[None]:
    """SIGTERM and SIGINT raise Stopped inside the block; the previous handlers return after it."""
    global _state
    _state = _State()
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers; the defaults then stay in force
        return
    previous = {signum: signal.signal(signum, _on_signal) for signum in SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextmanager
def deferred() -> Iterator[None]:
    """Hold a stop request until the block's writes are done, then raise it.

    Raising again at every block's end (not only once) also covers a Stopped that a __del__
    swallowed: the stop then happens at the next write at the latest.
    """
    _state.depth += 1
    try:
        yield
    finally:
        _state.depth -= 1
    if _state.depth == 0 and _state.pending is not None and not _state.finishing:
        raise Stopped(_state.pending)


def finishing() -> None:
    """From here on the run publishes its results and the process ends: requests are ignored.

    Stopping now would throw a finished run away (a finished run is not resumed, so running the
    command again would train a new one), while finishing takes a moment.
    """
    _state.finishing = True


def at(doing: str, kept: str) -> None:
    """What the process is doing and what survives a stop now, for the one-line report."""
    _state.doing, _state.kept = doing, kept
    wanted = os.environ.get(TEST_SIGNAL_ENV)
    if wanted and not _state.test_signal_sent:
        name, _, point = wanted.partition("@")
        if doing.startswith(point):
            _state.test_signal_sent = True
            os.kill(os.getpid(), signal.Signals[name])


def report(stop: Stopped) -> str:
    name = signal.Signals(stop.signum).name
    return (f"stopped by {name} {_state.doing}; {_state.kept}: run the same command again "
            "(or job6 restarts it) to continue")
