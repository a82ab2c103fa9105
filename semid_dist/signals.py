"""How a command meets Ctrl-C and SIGTERM while it runs (`one_interrupt`): the first stops it
as a KeyboardInterrupt the engines clean up after, the Ctrl-Cs after it are ignored; and as
its process exits (`exiting_signals`)."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, NoReturn

_terminated = False  # a SIGTERM stopped the command running now
_raised = False  # the command running now raised its KeyboardInterrupt (`raise_interrupt`)
_active = False  # a command runs under `one_interrupt` (in the main thread)


def terminated() -> bool:
    """Whether a SIGTERM (not a Ctrl-C) stopped the command running now: its line and
    status say so, and the Spark engine's guard takes it as a Ctrl-C where SIGINT is
    ignored."""
    return _terminated


def raise_interrupt() -> NoReturn:
    """Raise the command's KeyboardInterrupt for a Ctrl-C or SIGTERM, noted for
    `check_interrupted`."""
    global _raised
    _raised = True
    raise KeyboardInterrupt


def interrupt_raised() -> bool:
    """Whether the command running now (`one_interrupt`) raised its KeyboardInterrupt: an
    error after it is the stopping's doing, where the interrupt itself was dropped."""
    return _active and _raised


def check_interrupted() -> None:
    """Raise KeyboardInterrupt again where the command's interrupt was raised but did not
    stop it: Python drops an exception raised inside an object's finaliser (`__del__`)
    with an "Exception ignored" note, and a Ctrl-C that came as a Ray actor handle was
    collected, just after a Ray Train fit, let the build go on and commit (the Ctrl-Cs
    after it ignored). The build calls it after its fit and its encode and before its
    commit; it acts in the main thread of a command only (`one_interrupt`: a library
    build's interrupt is its caller's)."""
    if interrupt_raised() and threading.current_thread() is threading.main_thread():
        raise KeyboardInterrupt


def _drop_finaliser_interrupts(default: Callable[[Any], None]) -> Callable[[Any], None]:
    """A `sys.unraisablehook` that drops the command's KeyboardInterrupt raised inside a
    finaliser (`check_interrupted` raises it again) and hands anything else to `default`."""
    def hook(unraisable: Any) -> None:
        if not (_active and _raised and unraisable.exc_type is KeyboardInterrupt):
            default(unraisable)
    return hook


def one_interrupt() -> Callable[[], None]:
    """While a command runs: a Ctrl-C raises KeyboardInterrupt once, and the ones after it,
    while the job stops, are ignored, so the engine's clean-up runs to its end (a second
    Ctrl-C inside Ray's shutdown left its agent processes running, and printed tracebacks).
    A SIGTERM (`ray job stop`, `timeout`, a scheduler's cancel) stops it the same way: it
    runs the SIGINT handler in place (semid's, or the Spark engine's guard over it), so the
    engines' own Ctrl-C handling runs (it was the default death: no line, the version not
    given up); where a SIGINT the shell ignores left no handler, it raises KeyboardInterrupt
    itself. A SIGTERM after the command began to stop (a second one, one after a Ctrl-C)
    ends the process as SIGTERM does. Only in the main thread, and only over Python's own
    handlers (a SIGINT ignored by the shell that started it stays ignored); returns what
    puts them back. An interrupt raised inside a finaliser, which Python drops, is not
    printed and is raised again by `check_interrupted`."""
    global _terminated, _raised, _active
    _terminated = False
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    _raised, _active = False, True
    previous = signal.getsignal(signal.SIGINT)
    ours = previous is signal.default_int_handler

    def interrupt(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise_interrupt()

    def terminate(signum: int, frame: Any) -> None:
        global _terminated
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # (a second one: the default death)
        handler = signal.getsignal(signal.SIGINT)
        if _terminated or (ours and not callable(handler)):  # stopping already
            os.kill(os.getpid(), signal.SIGTERM)
            return
        _terminated = True
        if callable(handler):
            handler(signal.SIGINT, frame)
        else:
            raise_interrupt()

    interrupt.ignores_later_interrupts = True  # (the Spark engine's guard reads it)
    terminate.second_ends_process = True  # (and its `SignalsHeld`)
    if ours:
        signal.signal(signal.SIGINT, interrupt)
    before = signal.getsignal(signal.SIGTERM)
    if before is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, terminate)
    unraisable = sys.unraisablehook
    sys.unraisablehook = _drop_finaliser_interrupts(unraisable)

    def restore() -> None:
        global _raised, _active
        _raised = _active = False
        if ours:
            signal.signal(signal.SIGINT, previous)
        if before is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, before)
        sys.unraisablehook = unraisable
    return restore


def exiting_signals() -> None:
    """The process exits with the command's status: a Ctrl-C from here on is ignored (it
    would only kill the process, its work done), a SIGTERM has its default action (a
    handler of the command's would raise into the exit, or swallow it)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
