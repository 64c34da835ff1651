"""Which data-parallel engine core serves a new request, and which core owns a request already sent.

Pure bookkeeping (no processes, no I/O), driven by `DPCoreClient`:

- `route(request_id, children)` picks a core for one user request; all its children (n > 1
  samples) go to that core, so they share prompt blocks and are admitted all or none there.
- A core's load is its latest report (waiting + running sequences, from `SchedulerStats`) plus the
  sequences routed to it that no report has counted yet (`pending`); ties go to the lower KV usage,
  then the lower rank.
- Prefix affinity: a prompt's first full KV blocks (up to `affinity_blocks`, chained hashes, the
  cache salt mixed into the first) are remembered with the core they went to. A later prompt
  sharing the longest such prefix goes to that core, whose prefix cache holds those blocks, unless
  it carries more than `max_imbalance` sequences over the least loaded core (a bounded imbalance:
  one hot prefix cannot pile everything onto one core).
- Ownership: user request id and core request ids -> core, until finished, aborted or rejected,
  so aborts and stop-string hits go to the core that holds the request.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

from pagellm.core.scheduler import SchedulerStats
from pagellm.engine.core_interface import EngineCoreRequest

AFFINITY_BLOCKS = 4  # prompt blocks hashed for affinity: enough to tell system prompts apart, cheap to hash
MAX_PREFIXES = 16384  # remembered prefix keys (least recently used dropped first)


def default_max_imbalance(max_num_seqs: int) -> int:
    """Sequences a core may carry over the least loaded one and still get a prefix-sharing request."""
    return max(2, max_num_seqs // 8)


def prefix_keys(prompt_token_ids: Sequence[int], block_size: int, cache_salt: Optional[str] = None,
                max_blocks: int = AFFINITY_BLOCKS) -> list[int]:
    """One key per full block of the prompt's start (at most max_blocks), each covering all before it.

    A partial block is never keyed: the prefix cache shares only full blocks."""
    keys: list[int] = []
    previous: object = ("salt", cache_salt)
    for b in range(min(len(prompt_token_ids) // block_size, max_blocks)):
        previous = hash((previous, tuple(prompt_token_ids[b * block_size:(b + 1) * block_size])))
        keys.append(previous)  # type: ignore[arg-type]
    return keys  # type: ignore[return-value]


def combine_stats(stats: Iterable[SchedulerStats]) -> SchedulerStats:
    """One snapshot for several cores: counts and totals add up, KV usage is the mean (equal caches)."""
    items = list(stats)
    if len(items) == 1:
        return items[0]
    return SchedulerStats(
        num_running=sum(s.num_running for s in items),
        num_waiting=sum(s.num_waiting for s in items),
        kv_cache_usage=sum(s.kv_cache_usage for s in items) / len(items),
        num_preemptions_total=sum(s.num_preemptions_total for s in items),
        prefix_cache_queries=sum(s.prefix_cache_queries for s in items),
        prefix_cache_hits=sum(s.prefix_cache_hits for s in items),
        lora_running=_sum_counts(s.lora_running for s in items),
        lora_waiting=_sum_counts(s.lora_waiting for s in items),
    )


def _sum_counts(dicts) -> dict:
    total: dict = {}
    for counts in dicts:
        for key, n in counts.items():
            total[key] = total.get(key, 0) + n
    return total


@dataclass
class CoreLoad:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    # user request id -> sequences routed here that no report has counted yet
    pending: dict[str, int] = field(default_factory=dict)

    @property
    def load(self) -> int:
        return self.num_running + self.num_waiting + sum(self.pending.values())


class DPRouter:
    def __init__(self, num_cores: int, block_size: int, *, max_imbalance: int = 16,
                 prefix_affinity: bool = True, affinity_blocks: int = AFFINITY_BLOCKS,
                 max_prefixes: int = MAX_PREFIXES) -> None:
        if num_cores < 1:
            raise ValueError(f"DPRouter.num_cores must be >= 1, got {num_cores}")
        if max_imbalance < 0:
            raise ValueError(f"DPRouter.max_imbalance must be >= 0, got {max_imbalance}")
        self.num_cores = num_cores
        self.block_size = block_size
        self.max_imbalance = max_imbalance
        self.prefix_affinity = prefix_affinity
        self.affinity_blocks = affinity_blocks
        self.max_prefixes = max_prefixes
        self.cores = [CoreLoad() for _ in range(num_cores)]
        self._prefixes: OrderedDict[int, int] = OrderedDict()  # prefix key -> core it last went to
        self._owner: dict[str, int] = {}  # user request id -> core
        self._children: dict[str, list[str]] = {}  # user request id -> its core request ids still live
        self._child_owner: dict[str, tuple[int, str]] = {}  # core request id -> (core, user request id)

    # -- choosing -------------------------------------------------------------------------
    def loads(self) -> list[int]:
        return [c.load for c in self.cores]

    def least_loaded(self) -> int:
        return min(range(self.num_cores), key=lambda i: (self.cores[i].load, self.cores[i].kv_cache_usage, i))

    def choose(self, children: Sequence[EngineCoreRequest]) -> int:
        """The core for these children (one user request); records nothing."""
        least = self.least_loaded()
        if not self.prefix_affinity or not children:
            return least
        first = children[0]
        floor = self.cores[least].load
        for key in reversed(prefix_keys(first.prompt_token_ids, self.block_size, first.cache_salt,
                                        self.affinity_blocks)):  # the longest shared prefix first
            core = self._prefixes.get(key)
            if core is not None and self.cores[core].load <= floor + self.max_imbalance:
                return core
        return least

    def route(self, request_id: str, children: Sequence[EngineCoreRequest]) -> int:
        """Chooses a core and records it as the owner of the request and its children."""
        if request_id in self._owner:
            raise ValueError(f"request id {request_id!r} is already routed (to core {self._owner[request_id]})")
        core = self.choose(children)
        self._owner[request_id] = core
        self._children[request_id] = [c.request_id for c in children]
        for child in children:
            self._child_owner[child.request_id] = (core, request_id)
        self.cores[core].pending[request_id] = len(children)
        if self.prefix_affinity and children:
            first = children[0]
            for key in prefix_keys(first.prompt_token_ids, self.block_size, first.cache_salt, self.affinity_blocks):
                self._prefixes[key] = core
                self._prefixes.move_to_end(key)
            while len(self._prefixes) > self.max_prefixes:
                self._prefixes.popitem(last=False)
        return core

    # -- owners ---------------------------------------------------------------------------
    def owner(self, request_id: str) -> Optional[int]:
        return self._owner.get(request_id)

    def owner_of_core_request(self, core_request_id: str) -> Optional[int]:
        entry = self._child_owner.get(core_request_id)
        return entry[0] if entry is not None else None

    def split_by_owner(self, core_request_ids: Iterable[str]) -> dict[int, list[str]]:
        """Core request ids grouped by the core that holds them (unknown ids are dropped: already freed)."""
        out: dict[int, list[str]] = {}
        for core_id in core_request_ids:
            core = self.owner_of_core_request(core_id)
            if core is not None:
                out.setdefault(core, []).append(core_id)
        return out

    # -- reports and endings --------------------------------------------------------------
    def on_report(self, core: int, stats: SchedulerStats, added: Iterable[str] = (),
                  rejected: Iterable[str] = (), finished: Iterable[str] = ()) -> None:
        """A core's CoreOutputs: its stats now count the requests it `added` (no longer pending);
        `rejected` user requests and `finished` core requests are forgotten."""
        load = self.cores[core]
        load.num_running, load.num_waiting, load.kv_cache_usage = (stats.num_running, stats.num_waiting,
                                                                   stats.kv_cache_usage)
        for request_id in added:
            load.pending.pop(request_id, None)
        for request_id in rejected:
            self.forget(request_id)
        self.forget_core_requests(finished)

    def forget_core_requests(self, core_request_ids: Iterable[str]) -> None:
        """Finished or aborted children; a user request is forgotten with its last child."""
        for core_id in core_request_ids:
            entry = self._child_owner.pop(core_id, None)
            if entry is None:
                continue
            core, request_id = entry
            live = self._children.get(request_id)
            if live is not None and core_id in live:
                live.remove(core_id)
                if not live:
                    self._forget_request(request_id)

    def forget(self, request_id: str) -> None:
        for core_id in self._children.get(request_id, ()):
            self._child_owner.pop(core_id, None)
        self._forget_request(request_id)

    def _forget_request(self, request_id: str) -> None:
        core = self._owner.pop(request_id, None)
        self._children.pop(request_id, None)
        if core is not None:
            # Ended before a report counted it (aborted while still in the pipe): not pending any more.
            self.cores[core].pending.pop(request_id, None)

    @property
    def num_owned(self) -> int:
        return len(self._owner)
