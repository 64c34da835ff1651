"""Data parallelism: N engine cores (one child process each) behind one front end.

`DPCoreClient` speaks the interface of one `ProcessCoreClient` (wait_ready, start_reader, send,
close), so `AsyncLLM` drives N cores as it drives one:

    AddRequest          -> the core DPRouter picks (least loaded, prefix-aware; n > 1 children together)
    AbortRequests       -> split by owner, each part to the core holding those requests
    FinishOnStop        -> likewise
    StatsRequest        -> every core; answered once all have (their snapshots combined)
    ResetPrefixCache    -> every core; True only if every core reset
    Shutdown            -> every core

Every core's CoreOutputs reach the caller's callback as they come (stamped with the core's
`engine_index`, for per-core metrics); the router reads them first to update loads and owners.

Failure: the group lives and dies together. The first core to exit (killed, crashed) makes the
client dead: the caller's exit callback runs once, so AsyncLLM fails every in-flight request and
reports the engine dead (or, with restart_on_failure, starts a whole new group); the other cores
are told to shut down at once, and nothing waits on the dead core afterwards.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from typing import Callable, Optional

from pagellm.core.scheduler import SchedulerStats
from pagellm.engine.core_interface import (AbortRequests, AddRequest, CoreOutputs, CoreReady, FinishOnStop,
                                           ResetPrefixCache, Shutdown, StatsRequest)
from pagellm.engine.core_process import ProcessCoreClient
from pagellm.engine.dp_router import DPRouter, combine_stats, default_max_imbalance
from pagellm.engine.setup import ModelSetup

logger = logging.getLogger(__name__)


def cuda_device_slices(num_cores: int, ranks_per_core: int, visible: Optional[str],
                       device_count: int) -> list[str]:
    """CUDA_VISIBLE_DEVICES for each core: core i gets the i-th run of ranks_per_core devices
    (of the devices this process sees: its own CUDA_VISIBLE_DEVICES if set, else 0..count-1)."""
    ids = [d.strip() for d in visible.split(",") if d.strip()] if visible else [str(i) for i in range(device_count)]
    needed = num_cores * ranks_per_core
    if needed > len(ids):
        raise ValueError(f"EngineConfig.data_parallel_size: {num_cores} cores x {ranks_per_core} ranks = {needed} "
                         f"CUDA devices, but only {len(ids)} are visible ({','.join(ids) or 'none'})")
    return [",".join(ids[i * ranks_per_core:(i + 1) * ranks_per_core]) for i in range(num_cores)]


def core_device_slices(setup: ModelSetup) -> list[Optional[str]]:
    config = setup.config
    if not config.device.startswith("cuda"):
        return [None] * config.data_parallel_size  # the CPU: cores share the machine (threads split)
    import torch

    return list(cuda_device_slices(config.data_parallel_size, config.world_size,
                                   os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.device_count()))


class DPCoreClient:
    def __init__(self, setup: ModelSetup,
                 start_core: Callable[[ModelSetup, int, Optional[str]], ProcessCoreClient] = ProcessCoreClient,
                 router: Optional[DPRouter] = None) -> None:
        """Starts every core process (they load the model concurrently); `wait_ready` waits for all."""
        config = setup.config
        self.num_cores = config.data_parallel_size
        self.router = router or DPRouter(self.num_cores, config.block_size,
                                         max_imbalance=default_max_imbalance(config.max_num_seqs),
                                         prefix_affinity=config.enable_prefix_caching)
        self._lock = threading.Lock()  # the router and the answer tables: the caller and N reader threads
        self._dead: Optional[str] = None
        self._closing = False
        self._on_message: Optional[Callable[[object], None]] = None
        self._on_exit: Optional[Callable[[str], None]] = None
        # token -> {core: its answer}, until every core has answered
        self._stats_answers: dict[int, dict[int, SchedulerStats]] = {}
        self._reset_answers: dict[int, dict[int, bool]] = {}
        self._cores: list[ProcessCoreClient] = []
        try:
            for rank, devices in enumerate(core_device_slices(setup)):
                self._cores.append(start_core(setup, rank, devices))
        except BaseException:
            self.close(timeout=5.0)
            raise

    @property
    def pids(self) -> list[Optional[int]]:
        return [core.pid for core in self._cores]

    def wait_ready(self) -> CoreReady:
        """Blocks until every core is loaded; raises the first start-up error (the rest are stopped by close)."""
        readies = [core.wait_ready() for core in self._cores]
        summary = "; ".join(f"engine core {i}: {r.kv_cache_summary}" for i, r in enumerate(readies))
        return CoreReady(f"{self.num_cores} data-parallel engine cores: {summary}",
                         sum(r.num_blocks for r in readies))

    def start_reader(self, on_message: Callable[[object], None], on_exit: Callable[[str], None]) -> None:
        self._on_message, self._on_exit = on_message, on_exit
        for rank, core in enumerate(self._cores):
            core.start_reader(functools.partial(self._read, rank), functools.partial(self._exited, rank))

    # -- front end -> cores ---------------------------------------------------------------
    def send(self, message) -> None:
        """Raises BrokenPipeError once any core has died (the group is dead)."""
        if self._dead is not None:
            raise BrokenPipeError(f"the engine core group is dead: {self._dead}")
        if isinstance(message, AddRequest):
            with self._lock:
                core = self.router.route(message.request_id, message.children)
            try:
                self._cores[core].send(message)
            except BaseException:
                with self._lock:
                    self.router.forget(message.request_id)
                raise
        elif isinstance(message, AbortRequests):
            with self._lock:
                parts = self.router.split_by_owner(message.core_request_ids)
                self.router.forget_core_requests(message.core_request_ids)
            for core, ids in parts.items():
                self._cores[core].send(AbortRequests(ids))
        elif isinstance(message, FinishOnStop):
            with self._lock:
                parts: dict[int, list] = {}
                for core_id, stop in message.stops:
                    core = self.router.owner_of_core_request(core_id)
                    if core is not None:
                        parts.setdefault(core, []).append((core_id, stop))
            for core, stops in parts.items():
                self._cores[core].send(FinishOnStop(stops))
        elif isinstance(message, (StatsRequest, ResetPrefixCache)):
            table = self._stats_answers if isinstance(message, StatsRequest) else self._reset_answers
            with self._lock:
                table[message.token] = {}
            self._broadcast(message)
        elif isinstance(message, Shutdown):
            self._broadcast(message, quiet=True)
        else:
            raise TypeError(f"unknown message for the engine cores: {type(message).__name__}")

    def _broadcast(self, message, quiet: bool = False) -> None:
        for core in self._cores:
            try:
                core.send(message)
            except (OSError, ValueError):
                if not quiet:
                    raise

    # -- cores -> front end (on each core's reader thread) -------------------------------
    def _read(self, rank: int, message: object) -> None:
        if self._dead is not None:
            return  # the group is dead: the caller has failed everything already
        if isinstance(message, CoreOutputs):
            message.engine_index = rank
            with self._lock:
                finished = [u.req_id for u in message.updates if u.finish_reason is not None]
                self.router.on_report(rank, message.stats, message.added,
                                      [request_id for request_id, _ in message.rejected], finished)
                message.stats_answers = self._collect(self._stats_answers, rank,
                                                      {t: message.stats for t in message.stats_tokens}, combine_stats)
                message.stats_tokens = []
                message.reset_results = list(self._collect(self._reset_answers, rank, dict(message.reset_results),
                                                           all).items())
        if self._on_message is not None:
            self._on_message(message)

    def _collect(self, table: dict, rank: int, answers: dict, combine: Callable) -> dict:
        """Records this core's answers (token -> value); returns {token: combined} for the tokens
        every core has now answered."""
        done = {}
        for token, value in answers.items():
            got = table.get(token)
            if got is None:
                continue  # asked of a group that has died since
            got[rank] = value
            if len(got) == self.num_cores:
                del table[token]
                done[token] = combine([got[i] for i in range(self.num_cores)])
        return done

    def _exited(self, rank: int, reason: str) -> None:
        with self._lock:
            if self._dead is not None:
                return
            self._dead = f"data-parallel engine core {rank} of {self.num_cores}: {reason}"
            self._stats_answers.clear()
            self._reset_answers.clear()
            dead = self._dead
        if not self._closing:
            logger.error("engine core %d died; stopping the other %d: %s", rank, self.num_cores - 1, reason)
            self._broadcast(Shutdown(), quiet=True)  # they stop stepping; close() joins them
        if self._on_exit is not None:
            self._on_exit(dead)

    def close(self, timeout: float = 10.0) -> None:
        """Stops every core (all told first, then each joined), so N cores take one timeout, not N."""
        self._closing = True
        self._broadcast(Shutdown(), quiet=True)
        for core in self._cores:
            core.close(timeout)
