"""Named errors. Each message says what is wrong and how to fix it."""

from __future__ import annotations

from collections.abc import Iterator


class SemidError(Exception):
    """Base class for every error semid_dist raises on purpose."""


class ConfigError(SemidError):
    """A config key is unknown, missing, of the wrong type or out of range."""


class InputError(SemidError):
    """The catalog cannot be used as given (missing columns, no rows, bad rows under `fail`)."""


class EmptyCatalog(InputError):
    """The catalog's Parquet files (`files` of them, at `url`: redacted) hold no row;
    `schemas`: their distinct schemas, each with a file having it."""

    def __init__(self, message: str, *, url: str, files: int, schemas: tuple = ()) -> None:
        super().__init__(message)
        self.url, self.files, self.schemas = url, files, schemas


class NothingToEncode(Exception):
    """Not a failure: an incremental delta with no row, under `encode.empty_delta: skip`;
    nothing was written and the table is as it was. The message says so."""


class ArtifactError(SemidError):
    """A codebook artifact is missing, corrupt or does not match its checksums."""


class FitDiverged(SemidError):
    """A learned quantizer's training diverged (a loss that is not finite, or a
    reconstruction far worse than none); nothing is committed."""


class StoreError(SemidError):
    """The versioned table store refused an operation (unknown version, unreconciled counts)."""


class InterruptedAfterCommit(KeyboardInterrupt):
    """Ctrl-C after the build's version was committed (while `_latest` moved, the staging
    was removed or the summary printed): the version stands."""

    def __init__(self, version_id: str) -> None:
        super().__init__(version_id)
        self.version_id = version_id


class InterruptedBuild(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) under a build once it had started its version, before its commit:
    nothing was committed, and the same command resumes that version."""

    def __init__(self, resumes: str) -> None:
        super().__init__(resumes)
        self.resumes = resumes


def wrapped_errors(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then each error it wraps, outermost first: a Ray task's error's `cause` (Ray
    Data may wrap a task body's error once more, as the `__cause__` of its own), else the
    `__cause__` it was raised from."""
    seen: set[int] = set()
    node: BaseException | None = exc
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        yield node
        cause = getattr(node, "cause", None)
        node = cause if isinstance(cause, BaseException) else node.__cause__


def one_line(exc: BaseException) -> str:
    """An exception's text on one line (its type's name where it has none), to quote in a
    named error."""
    return " ".join(str(exc).split()) or type(exc).__name__
