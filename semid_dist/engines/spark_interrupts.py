"""The Spark engine's Ctrl-C: `InterruptGuard`, the SIGINT handler while the engine runs
(over pyspark's own), `claim_interrupt` for the engine's error paths, and `SignalsHeld`
while a session starts. py4j's records of
a command a Ctrl-C cut short are dropped while it stops the build.
"""

from __future__ import annotations

import _thread
import logging
import os
import signal
import sys
import threading
import time
from contextlib import suppress
from types import FrameType
from typing import TYPE_CHECKING, Any

from semid_dist.signals import raise_interrupt, terminated

if TYPE_CHECKING:
    from pyspark import SparkContext


class _Py4JRecords(logging.Filter):
    """Drops py4j's records: it logs a command cut short by Ctrl-C on the root logger, with
    the tracebacks of the broken connection."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _is_py4j(record.pathname)


_PY4J_LOGGERS = ("", "py4j.java_gateway", "py4j.clientserver")  # (root: its module-level
# logging calls; a logger's filter sees only the records logged on it, not its children's)


def _filter_py4j(quiet: logging.Filter, *, add: bool) -> None:
    for name in _PY4J_LOGGERS:
        logger = logging.getLogger(name)
        (logger.addFilter if add else logger.removeFilter)(quiet)


def _is_py4j(filename: str) -> bool:
    return f"{os.sep}py4j{os.sep}" in filename


def _in_py4j(frame: FrameType | None) -> bool:
    """Whether the thread of `frame` is inside a Py4J call (a command to the JVM)."""
    while frame is not None:
        if _is_py4j(frame.f_code.co_filename):
            return True
        frame = frame.f_back
    return False


class InterruptGuard:
    """The SIGINT handler while the Spark engine runs, in the main thread. A Ctrl-C cancels
    the session's running jobs from a thread of its own and stops the build
    (KeyboardInterrupt) once the driver is out of its Py4J call, if it is in one (a Ctrl-C
    more than `ESCALATE_S` after it, the driver still in its call, stops it there: a call no
    cancel ends); other Ctrl-Cs, while it stops, are ignored. pyspark's own handler cancels
    them from inside the signal, through the Py4J connection the driver waits on: the
    cancel failed ("reentrant call"), py4j printed two tracebacks, and the
    KeyboardInterrupt it raised inside that call could break the connection, so the build
    ended with a Py4J traceback (status 1). In a session the engine started, the JVM's
    warnings of the tasks the cancel kills are not printed either. While the engine closes
    (`hold`) a Ctrl-C is only noted, and raised once the session has stopped
    (`release`)."""

    ESCALATE_S = 3.0  # a cancelled job's call returns well within this
    RECANCEL_S = 0.5  # the cancel again, while the driver stays in its call

    def __init__(self, sc: SparkContext, started: bool, before: Any, pysparks: Any) -> None:
        self.sc, self.started = sc, started
        self.before, self.pysparks = before, pysparks  # the handlers to put back
        # a SIGINT ignored before a session the engine started (`nohup ... &`) stays
        # ignored: the guard stands for a SIGTERM only (`signals.one_interrupt`)
        self.sigint_ignored = started and before is signal.SIG_IGN
        self.pending = False  # a Ctrl-C came
        self.raised = False  # its KeyboardInterrupt was raised (or the engine is done)
        self.holding = False  # the engine closes: Ctrl-Cs are noted only
        self._first_at = 0.0  # when the first Ctrl-C came (time.monotonic)
        self._poked = False  # the next call is `_cancel`'s interrupt, not a Ctrl-C
        self._lock = threading.Lock()
        self._quiet = _Py4JRecords()

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        poked, self._poked = self._poked, False
        if self.raised or (self.sigint_ignored and not self.pending and not terminated()):
            return
        if not self.pending:
            self.pending, self._first_at = True, time.monotonic()
            _filter_py4j(self._quiet, add=True)
            if not self.holding:
                threading.Thread(target=self._cancel, name="semid-spark-cancel",
                                 daemon=True).start()
            if self.holding or _in_py4j(frame):
                return  # raised by `release`, or once the call returns (`_cancel` pokes)
        elif self.holding or (_in_py4j(frame) and (
                poked or time.monotonic() - self._first_at < self.ESCALATE_S)):
            return  # (a Ctrl-C soon after the first: the cancel is under way)
        self.claim()
        raise_interrupt()

    def claim(self) -> bool:
        """True once, where a Ctrl-C came and no KeyboardInterrupt was raised for it: the
        caller raises it (a Spark job's failure after the cancel is the cancel's)."""
        with self._lock:
            if not self.pending or self.raised:
                return False
            self.raised = True
            return True

    def _cancel(self) -> None:
        """Cancel the running jobs (the driver's call waiting on one returns), then interrupt
        the main thread until the handler raises there; while the driver stays in a Py4J
        call, cancel again every `RECANCEL_S` until the next Ctrl-C would stop it there
        (`ESCALATE_S`): a job the call started after the first cancel ran on to its end (a
        Ctrl-C in `sc.broadcast`, then the call's job)."""
        with suppress(Exception):  # the JVM gone already: nothing runs
            if self.started:
                self.sc.setLogLevel("ERROR")
            self.sc.cancelAllJobs()
        main, cancelled = threading.main_thread().ident, time.monotonic()
        while True:
            with self._lock:
                if self.raised or self.holding:
                    return
                if not _in_py4j(sys._current_frames().get(main)):  # (a poke does not wake
                    self._poked = True  # a blocked call: it would wait there, stale)
                    _thread.interrupt_main()
                elif (time.monotonic() - cancelled >= self.RECANCEL_S
                        and cancelled - self._first_at < self.ESCALATE_S):
                    cancelled = time.monotonic()  # (under the lock: none after `release`)
                    with suppress(Exception):
                        self.sc.cancelAllJobs()
            time.sleep(0.05)

    def hold(self) -> None:
        """The engine closes (the session stops): from now on a Ctrl-C is only noted."""
        with self._lock:
            self.holding = True

    def release(self, *, raise_pending: bool = True) -> None:
        """The engine is done: put back the handler from before the session where the
        engine started it (and so stopped it), else pyspark's (a session that lives on);
        SIG_IGN instead of a handler that ignores all but the first Ctrl-C (semid's) once
        one came. py4j's records are printed again. A Ctrl-C that came and was not raised
        is raised now, unless the engine closes on another exception (`raise_pending`
        False: that one goes on, not hidden behind an interrupt)."""
        global _GUARD
        unraised = self.claim()
        with self._lock:
            self.raised = True
        _filter_py4j(self._quiet, add=False)
        if _GUARD is self:
            _GUARD = None
        handler = self.before if self.started else self.pysparks
        once = getattr(handler, "ignores_later_interrupts", False)
        signal.signal(signal.SIGINT, signal.SIG_IGN if self.pending and once else handler)
        if unraised and raise_pending:
            raise KeyboardInterrupt


def guard_interrupts(sc: SparkContext, before: Any, started: bool) -> InterruptGuard | None:
    """Install an `InterruptGuard` over pyspark's handler (pyspark installs its own as a
    session starts in the main thread, over any other; its `before`). A SIGINT ignored
    before a session the engine started stays ignored (the guard then takes a SIGTERM
    only). None where no guard stands."""
    global _GUARD
    pysparks = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread():
        return None
    if not callable(pysparks) and not (started and before is signal.SIG_IGN):
        return None
    guard = _GUARD = InterruptGuard(sc, started, before, pysparks)
    signal.signal(signal.SIGINT, guard)
    return guard


_GUARD: InterruptGuard | None = None


def claim_interrupt() -> bool:
    """True where a Ctrl-C came while the engine runs (a Spark call's failure from then on
    is the cancel's): the caller raises KeyboardInterrupt, also where the guard raised one
    already (Python drops one raised inside a finaliser, `__del__`; the cancelled job's
    failure came after it, printed as a Py4J traceback, status 1). Noted as raised
    (`InterruptGuard.claim`): the cancel thread interrupts no more."""
    if _GUARD is None or not _GUARD.pending:
        return False
    _GUARD.claim()
    return True


class SignalsHeld:
    """A Ctrl-C or SIGTERM held while the driver JVM launches and the session starts, and
    sent again as the block ends (the caller stops the session first, where one came): one
    raised in pyspark's launch left the JVM it had started running, out of this process's
    session and waiting for a connection, for good; one raised inside a call to it made
    Py4J log a traceback. A second one is not held (a start that blocks, a master that does
    not answer, is stopped where it is; the JVM may then be left running): a second Ctrl-C
    is raised there, as the first SIGTERM's where one came first, and a SIGTERM after
    either ends the process, as `signals.one_interrupt` has it; while the session stops
    (`stopping`) a Ctrl-C more waits for it. A SIGINT ignored stays ignored, and a handler
    set from C is left alone. pyspark puts its own SIGINT handler in as the context starts:
    `keep_pysparks` holds a SIGINT again over it, and puts it back as the block ends (the
    engine's guard goes over it) where nothing was held."""

    def __init__(self) -> None:
        self.held: list[int] = []
        self._before: dict[int, Any] = {}
        self._pysparks: Any = None
        self._escalated = self._stopping = False

    def __enter__(self) -> SignalsHeld:
        if threading.current_thread() is threading.main_thread():
            self._before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
            for sig, handler in self._before.items():
                if handler not in (signal.SIG_IGN, None):
                    signal.signal(sig, self._hold)
        return self

    def _hold(self, signum: int, frame: Any) -> None:
        if not self.held:
            self.held.append(signum)
            return
        if self._stopping and signum == signal.SIGINT:
            return
        self._escalated = True
        self._put_back()
        before = self._before[signal.SIGTERM]
        if signum == signal.SIGTERM and (before == signal.SIG_DFL or getattr(
                before, "second_ends_process", False)):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.raise_signal(signal.SIGTERM if signal.SIGTERM in (self.held[0], signum)
                            else signum)

    def keep_pysparks(self) -> None:
        """After the session's start: pyspark's SIGINT handler noted, a SIGINT held again
        (where one was held before the start)."""
        handler = signal.getsignal(signal.SIGINT)
        if not self._before or self._escalated or handler == self._hold:
            return
        self._pysparks = handler
        if self._before[signal.SIGINT] not in (signal.SIG_IGN, None):
            signal.signal(signal.SIGINT, self._hold)

    def stopping(self) -> None:
        """The session stops (a signal was held): a Ctrl-C more waits for it."""
        self._stopping = True

    def _put_back(self) -> None:
        for sig, handler in self._before.items():
            if handler is not None:
                signal.signal(sig, handler)

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        if not self._before:
            return
        if not self._escalated:
            self._put_back()
        elif kind is not None or not self.held:  # (a handler that raised nothing: below)
            return
        if self.held:
            signal.raise_signal(self.held[0])
        elif self._pysparks is not None:
            signal.signal(signal.SIGINT, self._pysparks)
