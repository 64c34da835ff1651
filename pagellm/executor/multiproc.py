"""Tensor and pipeline parallelism on one machine: one spawned process per rank, driven over one
pipe per rank.

The engine core (scheduler) stays in the calling process, which is not a rank. Each step it sends
the SchedulerOutput to every rank and reads the ModelRunnerOutput from the last pipeline stage's
tp rank 0 only (logits are all-gathered and seeds equal, so every rank of that stage samples the
same ids); other ranks answer an ack. With pipeline parallelism `execute_async` sends a step and
returns at once; its future collects the replies later, while the ranks already run the next
steps (each rank serves its pipe in order, so replies come back in step order).
The ranks talk to each other through torch.distributed (gloo on the CPU, NCCL on CUDA).
A rank that dies or raises makes `execute` raise `RankFailure` within about a poll interval;
a rank whose parent pipe closes (the parent died) exits, so nothing is left behind.
"""

from __future__ import annotations

import contextlib
import collections
import logging
import multiprocessing
import shutil
import tempfile
import traceback
from multiprocessing import connection as mp_connection
from multiprocessing import util as mp_util
from typing import Any, Iterator, Optional

from pagellm.core.scheduler import SchedulerOutput
from pagellm.executor.base import Executor, RankFailure
from pagellm.worker.outputs import ModelRunnerOutput

logger = logging.getLogger(__name__)

POLL_S = 0.2  # how often a waiting driver checks that every rank is still alive
START_TIMEOUT_S = 300.0  # loading a shard: generous, but a hung rank must not hang start-up forever


def _rank_main(rank: int, setup, init_method: str, conn) -> None:
    """A rank's process: join the groups, build this rank's shard, then serve calls until EOF."""
    from pagellm.distributed.parallel_state import destroy_parallel
    from pagellm.executor.rank_bootstrap import init_rank_worker

    try:
        worker, _ = init_rank_worker(rank, setup, init_method, local_device=rank)
        conn.send(("ok", None))
    except BaseException:  # noqa: BLE001 - reported to the driver, which raises it
        conn.send(("error", traceback.format_exc()))
        return
    try:
        _serve(rank, worker, conn)
    finally:
        destroy_parallel()


def _serve(rank: int, worker, conn) -> None:
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return  # the driver is gone
        if msg is None:
            return
        method, args, kwargs, reply = msg
        try:
            result = getattr(worker, method)(*args, **kwargs)
            conn.send(("ok", result if reply else None))
        except BaseException:  # noqa: BLE001
            conn.send(("error", f"rank {rank}: {traceback.format_exc()}"))


def _stop_ranks(procs: list, conns: list, rendezvous_dir: str) -> None:
    """Asks every rank to exit, then terminates and kills what is left; idempotent."""
    for conn in conns:
        try:
            conn.send(None)
        except (OSError, ValueError):
            pass
    for proc in procs:
        proc.join(timeout=2.0)
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=2.0)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=2.0)
    for conn in conns:
        conn.close()
    shutil.rmtree(rendezvous_dir, ignore_errors=True)


@contextlib.contextmanager
def _allow_children() -> Iterator[None]:
    """The engine core may run in a daemonic process, which multiprocessing forbids to start
    children. Its ranks are still ours to stop (the finalizer, pipe EOF, daemon termination at
    exit), so the flag is lifted for the duration of the start."""
    config = multiprocessing.current_process()._config  # noqa: SLF001 - no public switch exists
    daemon = config.get("daemon", False)
    config["daemon"] = False
    try:
        yield
    finally:
        config["daemon"] = daemon


class _PendingStep:
    """A step sent to every rank whose replies are not read yet (`StepFuture`)."""

    def __init__(self, executor: "MultiprocExecutor") -> None:
        self._executor = executor
        self.done = False
        self.output: Optional[ModelRunnerOutput] = None
        self.error: Optional[BaseException] = None

    def result(self) -> ModelRunnerOutput:
        self._executor._collect_until(self)
        if self.error is not None:
            raise self.error
        return self.output


class MultiprocExecutor(Executor):
    def __init__(self, setup) -> None:
        super().__init__(setup.config)
        self._pending: collections.deque[_PendingStep] = collections.deque()  # oldest first
        self._failure: Optional[str] = None
        ctx = multiprocessing.get_context("spawn")
        rendezvous_dir = tempfile.mkdtemp(prefix="pagellm-tp-")
        init_method = f"file://{rendezvous_dir}/rendezvous"
        self._procs, self._conns = [], []
        with _allow_children():
            for rank in range(self.world_size):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_rank_main, args=(rank, setup, init_method, child),
                                   name=f"pagellm-tp-rank{rank}", daemon=True)
                proc.start()
                child.close()
                self._procs.append(proc)
                self._conns.append(parent)
        # Runs on shutdown(), on garbage collection, or at exit, whichever comes first; a
        # multiprocessing Finalize (not weakref.finalize) so that it also runs in a process started by
        # multiprocessing before that process joins its non-daemonic children.
        self._finalizer = mp_util.Finalize(self, _stop_ranks, (self._procs, self._conns, rendezvous_dir),
                                           exitpriority=10)
        try:
            self._gather(range(self.world_size), timeout=START_TIMEOUT_S)
        except BaseException:
            self._finalizer()
            raise
        device = setup.config.device
        devices = [f"{device}:{r}" if device.startswith("cuda") else device for r in range(self.world_size)]
        logger.info("parallel layout: %s, executor=mp, rank devices %s, rank pids %s", setup.config.layout_summary(),
                    devices, [p.pid for p in self._procs])

    def _call(self, method: str, args: tuple, kwargs: dict, reply_ranks) -> list[Any]:
        if self._pending:
            self._collect_until(self._pending[-1])  # replies come in order: earlier steps' first
        self._send(method, args, kwargs, reply_ranks)
        return self._gather(range(self.world_size))

    def _send(self, method: str, args: tuple, kwargs: dict, reply_ranks) -> None:
        if self._failure is not None:
            raise RankFailure(self._failure)
        for rank, conn in enumerate(self._conns):
            try:
                conn.send((method, args, kwargs, rank in reply_ranks))
            except (OSError, ValueError) as exc:
                self._fail(f"rank {rank} of {self.world_size} is unreachable ({exc})")

    def _collect_until(self, step: _PendingStep) -> None:
        """Reads the replies of the pending steps up to `step`, oldest first."""
        while not step.done:
            oldest = self._pending.popleft()
            if self._failure is not None:
                oldest.error, oldest.done = RankFailure(self._failure), True
                continue
            try:
                oldest.output = self._gather(range(self.world_size))[self.output_rank]
            except RankFailure as exc:  # kept for whoever waits on this step; later ones fail the same way
                oldest.error = exc
            oldest.done = True

    def _gather(self, ranks, timeout: Optional[float] = None) -> list[Any]:
        """Every rank's reply; raises RankFailure when one died or raised (never waits on a dead rank).

        All pipes are watched at once: a rank that raised may leave its peers stuck in a collective."""
        results: dict[int, Any] = {}
        errors: list[str] = []
        pending = {self._conns[r]: r for r in ranks}
        waited = 0.0
        while pending:
            for conn in mp_connection.wait(list(pending), timeout=POLL_S):
                rank = pending.pop(conn)
                try:
                    status, value = conn.recv()
                except (EOFError, OSError):
                    self._fail(f"rank {rank} of {self.world_size} (pid {self._procs[rank].pid}) closed its pipe")
                if status == "error":
                    errors.append(value)
                results[rank] = value
            waited += POLL_S
            for rank in pending.values():
                proc = self._procs[rank]
                if not proc.is_alive():
                    self._fail(f"rank {rank} of {self.world_size} (pid {proc.pid}) died with exit code {proc.exitcode}")
            if errors and waited > 2.0:
                break  # the peers of a failed rank may never answer
            if timeout is not None and waited > timeout:
                self._fail(f"ranks {sorted(pending.values())} did not answer within {timeout:.0f} s")
        if errors:
            self._fail(errors[0])
        return [results[r] for r in ranks]

    def _fail(self, message: str) -> None:
        self._failure = message
        logger.error("%s", message)
        raise RankFailure(message)

    def collective_rpc(self, method: str, args: tuple = (), kwargs: Optional[dict] = None) -> list[Any]:
        return self._call(method, args, kwargs or {}, reply_ranks=range(self.world_size))

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        # The output rank's output is the step's output; the others only acknowledge.
        return self._call("execute_model", (sched,), {}, reply_ranks=(self.output_rank,))[self.output_rank]

    def execute_async(self, sched: SchedulerOutput) -> _PendingStep:
        """Sends the step to every rank and returns; the future reads the replies when asked."""
        self._send("execute_model", (sched,), {}, reply_ranks=(self.output_rank,))
        step = _PendingStep(self)
        self._pending.append(step)
        return step

    def rank_pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def shutdown(self) -> None:
        self._finalizer()
