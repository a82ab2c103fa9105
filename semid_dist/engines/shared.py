"""Ship an argument that many tasks of one `map` share (the job context, a table every shard
reads) once, not once per task: `split_shared` swaps each such object for a marker, the
engine sends the shared objects once (a Ray object / a Spark broadcast), and `resolve` puts
them back inside the task."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Shared:
    """Marker for the `index`-th shared object."""

    index: int


def split_shared(items: list[tuple]) -> tuple[list[Any], list[tuple]]:
    """-> (objects that appear, as the same object, in more than one item; the items with
    each of those replaced by its `Shared` marker)."""
    seen: dict[int, int] = {}
    for item in items:
        for arg in item:
            seen[id(arg)] = seen.get(id(arg), 0) + 1
    index: dict[int, int] = {}
    shared: list[Any] = []
    out = []
    for item in items:
        args = []
        for arg in item:
            if seen[id(arg)] > 1 and arg is not None:
                if id(arg) not in index:
                    index[id(arg)] = len(shared)
                    shared.append(arg)
                args.append(Shared(index[id(arg)]))
            else:
                args.append(arg)
        out.append(tuple(args))
    return shared, out


def resolve(item: tuple, shared: list[Any] | tuple[Any, ...]) -> tuple:
    """The task's real arguments: markers replaced by the shared objects."""
    return tuple(shared[a.index] if isinstance(a, Shared) else a for a in item)
