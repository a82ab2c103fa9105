"""The encode stage of a build: run the engine's encode over the shards a killed run did not
finish, merge their statistics in shard order as results arrive, and check the rejected rows
against the config (`semid_dist.pipeline` calls it between the fit and the reduce)."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from semid_dist.codes.partials import Partial, StreamMerge, merge
from semid_dist.config import BuildConfig
from semid_dist.errors import InputError, SemidError
from semid_dist.faults import maybe_die
from semid_dist.io.catalog import CatalogPlan
from semid_dist.io.store import FileEntry, TableStore
from semid_dist.io.validate import DIMENSION_RULE, reasons_text
from semid_dist.shard_results import load_shard_results, load_shard_statistics
from semid_dist.stages import JobContext
from semid_dist.summary import counted

if TYPE_CHECKING:
    from semid_dist.engines import Engine

Log = Callable[[str], None]
# Statistics parts of a shard result: all items, and the popularity head / tail.
PARTS = ("all", "head", "tail")


def encode_shards(engine: Engine, ctx: JobContext, plan: CatalogPlan, log: Log,
                  timings: dict[str, float],
                  ) -> tuple[dict[str, Partial], dict[str, int], list[FileEntry], dict[str, int]]:
    """Run the encode stage over the shards a killed run of this version did not finish;
    returns ({"all"|"head"|"tail": merged statistics}, counts, reject files, rejected rows per
    reason). Sets timings["encode_first_shard_s"]: seconds until the engine's first shard
    result (its start-up plus one shard; the rest of the stage is its steady pace), and
    timings["encode_worker_<step>_s"]: the workers' seconds in each step of a shard
    (`EncodeWorker`), summed over the shards this run encoded.

    Shard statistics are merged in shard order as results arrive (results that come early
    wait for their turn), so the merge is the same on every engine whatever order its shards
    finish in. An engine carries a shard's counts only; its statistics are read from the
    shard's staged result at its turn, so memory holds the running total (and the SID
    count tables of O(log shards) runs: `StreamMerge`), however many results wait or
    however many an engine collects at once. With a head / tail split a
    shard stages only those two, and the whole catalog's statistics are the merge of the
    merged head and the merged tail."""
    store = ctx.store()
    stats = _InShardOrder(store, ctx.version_id, plan)
    tally = _Tally()
    done = load_shard_results(store, ctx.version_id)
    todo = [s for s in plan.shards if s.index not in done]
    if done:
        log(f"encode: {counted(len(done), 'shard')} done by the unfinished run, "
            f"{len(todo)} to go")
    else:
        log(f"encode: {counted(len(todo), 'shard')} of "
            f"{counted(sum(s.num_rows for s in todo), 'row')} on engine {engine.name}")

    def results():
        yield from (done[i] for i in sorted(done))
        start = time.monotonic()
        for n, res in enumerate(engine.encode(ctx, todo)):
            if n == 0:
                timings["encode_first_shard_s"] = time.monotonic() - start
            if n == 1:
                maybe_die("encode")
            yield res

    for i, res in enumerate(results(), 1):
        stats.arrived(res["index"])
        tally.add(res)
        # progress at every tenth of the plan's shards, those the interrupted run did counted
        # without a line (the line above says how many), and the totals at the end
        if i == len(plan.shards) or (i > len(done)
                                     and i % max(1, len(plan.shards) // 10) == 0):
            log(f"encode: {i}/{len(plan.shards)} shards, {tally.counts['encoded']} rows "
                f"encoded, {tally.counts['rejected']} rejected")
    stats.check_complete()
    if tally.reasons:
        log(f"encode: rejected rows by reason: {reasons_text(tally.reasons)}")
    if tally.steps and todo:
        timings.update({f"encode_worker_{step}_s": s for step, s in tally.steps.items()})
        log(f"encode: worker time per shard ({counted(len(todo), 'shard')}): "
            f"{steps_text(tally.steps, len(todo))}")
    return (stats.result(), tally.counts, sorted(tally.rejects, key=lambda e: e.path),
            dict(tally.reasons))


class _InShardOrder:
    """The shards' statistics merged in shard order: a shard's staged statistics are read
    and pushed when every shard before it has arrived (`arrived`, which raises SemidError
    for a shard that arrives twice or that the plan does not hold: its counts would not
    reconcile); `check_complete` raises it when a shard never arrived."""

    def __init__(self, store: TableStore, version_id: str, plan: CatalogPlan) -> None:
        self.store, self.version_id = store, version_id
        self.merged = {part: StreamMerge() for part in PARTS}
        self.waiting: set[int] = set()
        self.planned = {s.index for s in plan.shards}
        self.seen: set[int] = set()
        self.order = iter(sorted(self.planned))
        self.turn = next(self.order, None)

    def arrived(self, index: int) -> None:
        if index in self.seen or index not in self.planned:
            why = "twice" if index in self.seen else "that the plan does not hold"
            raise SemidError(f"encode: the engine returned a result for shard {index} {why}; "
                             "nothing was committed. Re-run the build")
        self.seen.add(index)
        self.waiting.add(index)
        while self.turn in self.waiting:
            self.waiting.remove(self.turn)
            # a shard split into head and tail stages those two; "all" is their merge (below)
            for part, partial in load_shard_statistics(self.store, self.version_id,
                                                       self.turn).items():
                self.merged[part].push(partial)
            self.turn = next(self.order, None)

    def check_complete(self) -> None:
        if self.turn is not None:
            raise SemidError(f"encode: the engine returned no result for shard {self.turn}; "
                             "nothing was committed. Re-run the build: finished shards are "
                             "reused")

    def result(self) -> dict[str, Partial]:
        """{"all"|"head"|"tail": merged statistics}."""
        partials = {part: m.result() for part, m in self.merged.items() if len(m)}
        if "all" not in partials:
            partials["all"] = merge(partials["head"], partials["tail"])
        return partials


class _Tally:
    """The shard results' counts, reject files, rejected rows per reason and worker seconds
    per step (of this run's shards: a resumed run's staged results carry none)."""

    def __init__(self) -> None:
        self.counts = {"input": 0, "encoded": 0, "rejected": 0}
        self.rejects: list[FileEntry] = []
        self.reasons: Counter[str] = Counter()
        self.steps: Counter[str] = Counter()

    def add(self, res: dict) -> None:
        self.counts["input"] += res["rows"]
        self.counts["encoded"] += res["encoded"]
        self.counts["rejected"] += res["rejected"]
        self.reasons.update(json.loads(res.get("reasons") or "{}"))
        self.steps.update(json.loads(res.get("seconds") or "{}"))
        if res["rejects_file"] is not None:
            self.rejects.append(res["rejects_file"])


def steps_text(steps: dict[str, float], shards: int) -> str:
    """'read 62 ms (19%), validate 10 ms (3%), ...': each step's mean per shard and share."""
    total = sum(steps.values()) or 1.0
    return ", ".join(f"{step} {s / shards * 1e3:.0f} ms ({s / total:.0%})"
                     for step, s in steps.items())


def check_rejects(counts: dict[str, int], reasons: dict[str, int],
                  cfg: BuildConfig) -> None:
    """Fail (nothing committed) on any rejected row under input.on_bad_rows=fail, or above
    input.max_reject_fraction; the message counts the rejected rows by reason."""
    why = reasons_text(reasons)
    # (rows of another length: how the dimension they are measured against was decided)
    rule = f" ({DIMENSION_RULE})" if any(r.startswith("embedding dim ") for r in reasons) else ""
    if counts["rejected"] and cfg.input.on_bad_rows == "fail":
        raise InputError(f"{counts['rejected']} bad rows ({why}) and input.on_bad_rows=fail; "
                         "nothing was committed. Fix the catalog or set "
                         f"input.on_bad_rows=reject{rule}")
    share = counts["rejected"] / max(counts["input"], 1)
    if share > cfg.input.max_reject_fraction:
        raise InputError(f"{counts['rejected']} of {counts['input']} rows rejected ({share:.2%}: "
                         f"{why}) > input.max_reject_fraction="
                         f"{cfg.input.max_reject_fraction}; nothing was committed. Fix the "
                         f"catalog or raise the limit{rule}")
    if counts["encoded"] == 0:  # (every row rejected, under max_reject_fraction=1)
        raise InputError(f"no valid rows to encode: all {counts['input']} rows rejected "
                         f"({why}); nothing was committed. Fix the catalog{rule}")
