"""Tensor and pipeline parallelism across machines: one Ray actor per rank, in a placement group.

The engine core (scheduler) stays in the calling process, the Ray driver; each of the tp x pp
ranks is an actor placed in its own bundle of one placement group (`ray_placement.py`). Rank 0's
actor names its node's IP and a free port, and every rank joins torch.distributed there over TCP
(gloo on the CPU, NCCL on CUDA), then builds its shard with `init_rank_worker`, as an mp rank does.

Per step the SchedulerOutput is put into the object store once and every actor runs
`execute_model` on it; the last pipeline stage's tp rank 0 returns the ModelRunnerOutput, the others
None. An actor runs its calls one at a time in submission order, so `execute_async` only submits
and returns a future over the step's ObjectRefs: with pipeline parallelism the next micro-batches
are already queued on the first stage while the last one finishes.
Waiting polls `ray.wait`, so an actor that died (ray.kill, kill -9, its node lost) or raised makes
the wait raise `RankFailure` within a poll interval and never hangs on peers stuck in a collective.
Shutdown kills the actors, removes the placement group and stops a Ray instance we started.
"""

from __future__ import annotations

import logging
import socket
from multiprocessing import util as mp_util
from typing import Any, Optional, Sequence

import ray
from ray.exceptions import RayActorError, RayError
from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pagellm.core.scheduler import SchedulerOutput
from pagellm.executor.base import Executor, RankFailure
from pagellm.executor.ray_placement import connect, placement_settings, reserve
from pagellm.worker.outputs import ModelRunnerOutput

logger = logging.getLogger(__name__)

POLL_S = 0.2  # how often a wait checks for a rank's error (a dead actor's call errors at once)
START_TIMEOUT_S = 300.0  # starting an actor and loading a shard; a hung rank must not hang start-up
ERROR_GRACE_S = 1.0  # after a rank's error, how long the other ranks may still report theirs
STOP_TIMEOUT_S = 2.0  # a rank's graceful exit (leaving its process group) before it is killed


def _describe(rank: int, world_size: int, exc: RayError) -> str:
    """One line first (what happened to which rank), then Ray's text (a raised error's traceback)."""
    text = str(exc).strip()
    if isinstance(exc, RayActorError):
        return f"rank {rank} of {world_size} (Ray actor) died: {text.splitlines()[0] if text else type(exc).__name__}"
    last = text.splitlines()[-1] if text else type(exc).__name__
    return f"rank {rank} of {world_size} (Ray actor) raised: {last}\n{text}"


class RankActor:
    """One rank in a Ray worker process (wrapped with `ray.remote` by the executor)."""

    def __init__(self) -> None:
        self.worker = None

    def where(self) -> dict:
        import os

        return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address(),
                "pid": os.getpid()}

    def free_port(self) -> int:
        # Bound then released: the process group binds it again a moment later, on this node.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("", 0))
            return sock.getsockname()[1]

    def start(self, rank: int, setup, init_method: str, threads_per_rank: int) -> None:
        from pagellm.executor.rank_bootstrap import init_rank_worker

        # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU, so it is always device 0 here.
        self.worker, _ = init_rank_worker(rank, setup, init_method, local_device=0,
                                          threads_per_rank=threads_per_rank)

    def call(self, method: str, args: tuple, kwargs: dict) -> Any:
        return getattr(self.worker, method)(*args, **kwargs)

    def execute(self, sched, reply: bool) -> Any:
        # `sched` is a top-level argument, so Ray resolves its ObjectRef before the call.
        output = self.worker.execute_model(sched)
        return output if reply else None

    def stop(self) -> None:
        from pagellm.distributed.parallel_state import destroy_parallel

        destroy_parallel()


class _Held:
    """What the executor holds in the cluster, released once by `release` (shutdown, GC or exit)."""

    def __init__(self, started_ray: bool) -> None:
        self.started_ray = started_ray
        self.actors: list = []
        self.group = None
        self.failed = False  # peers of a failed rank may be stuck in a collective: no graceful stop

    def release(self) -> None:
        if not ray.is_initialized():
            return
        if self.actors and not self.failed:
            ray.wait([a.stop.remote() for a in self.actors], num_returns=len(self.actors), timeout=STOP_TIMEOUT_S)
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        if self.group is not None:
            remove_placement_group(self.group)
            self.group = None
        if self.started_ray:
            ray.shutdown()


class _RayStep:
    """A submitted step (`StepFuture`): its ObjectRefs, one per rank."""

    def __init__(self, executor: "RayExecutor", refs: list) -> None:
        self._executor, self._refs = executor, refs
        self._done = False
        self._output: Optional[ModelRunnerOutput] = None
        self._error: Optional[BaseException] = None

    def result(self) -> ModelRunnerOutput:
        if not self._done:
            try:
                self._output = self._executor._gather(self._refs)[self._executor.output_rank]
            except RankFailure as exc:
                self._error = exc
            self._done = True
        if self._error is not None:
            raise self._error
        return self._output


class RayExecutor(Executor):
    def __init__(self, setup) -> None:
        super().__init__(setup.config)
        config = setup.config
        settings = placement_settings()
        self._failure: Optional[str] = None
        self._held = _Held(connect())
        # Runs on shutdown(), on garbage collection, or at exit, also in an engine-core child process.
        self._finalizer = mp_util.Finalize(self, self._held.release, exitpriority=10)
        try:
            self._start(setup, settings)
        except BaseException:
            self._finalizer()
            raise
        logger.info("parallel layout: %s, executor=ray, ranks on nodes %s (placement %s)", config.layout_summary(),
                    [w["node_id"][:8] for w in self._where], settings.strategy)

    def _start(self, setup, settings) -> None:
        config = setup.config
        cuda = config.device.startswith("cuda")
        group, cpus = reserve(self.world_size, config.device, settings, config.layout_summary())
        self._held.group = group
        actor_cls = ray.remote(RankActor)
        for rank in range(self.world_size):
            options = dict(num_cpus=0 if cuda else cpus, num_gpus=1 if cuda else 0, max_restarts=0,
                           max_task_retries=0,
                           scheduling_strategy=PlacementGroupSchedulingStrategy(
                               placement_group=group, placement_group_bundle_index=rank))
            self._held.actors.append(actor_cls.options(**options).remote())
        actors = self._held.actors
        self._where = self._gather([a.where.remote() for a in actors], timeout=START_TIMEOUT_S)
        host = self._where[0]["ip"]
        port = self._gather([actors[0].free_port.remote()])[0]
        init_method = f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"
        setup_ref = ray.put(setup)
        self._gather([a.start.remote(rank, setup_ref, init_method, 0 if cuda else cpus)
                      for rank, a in enumerate(actors)], timeout=START_TIMEOUT_S)

    def _gather(self, refs: Sequence, timeout: Optional[float] = None) -> list[Any]:
        """Every rank's result in rank order; raises RankFailure soon after a rank died or raised.

        After the first error the others get ERROR_GRACE_S to report too, so that the rank that died
        is named rather than a peer whose collective it broke (peers may also never answer)."""
        index = {ref: rank for rank, ref in enumerate(refs)}
        results: dict[int, Any] = {}
        errors: dict[int, RayError] = {}
        pending = list(refs)
        waited = since_error = 0.0
        while pending and not (errors and since_error > ERROR_GRACE_S):
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL_S)
            for ref in ready:
                try:
                    results[index[ref]] = ray.get(ref)
                except RayError as exc:
                    errors[index[ref]] = exc
            waited += POLL_S
            since_error += POLL_S if errors else 0.0
            if pending and not errors and timeout is not None and waited > timeout:
                self._fail(f"ranks {sorted(index[r] for r in pending)} did not answer within {timeout:.0f} s")
        if errors:
            died = [r for r, e in errors.items() if isinstance(e, RayActorError)]
            rank = min(died or errors)
            self._fail(_describe(rank, self.world_size, errors[rank]))
        return [results[r] for r in range(len(refs))]

    def _fail(self, message: str) -> None:
        self._failure = message
        self._held.failed = True
        logger.error("%s", message)
        raise RankFailure(message)

    def collective_rpc(self, method: str, args: tuple = (), kwargs: Optional[dict] = None) -> list[Any]:
        if self._failure is not None:
            raise RankFailure(self._failure)
        return self._gather([actor.call.remote(method, args, kwargs or {}) for actor in self._held.actors])

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self.execute_async(sched).result()

    def execute_async(self, sched: SchedulerOutput) -> _RayStep:
        """Submits the step to every rank and returns at once; the future waits on its refs."""
        if self._failure is not None:
            raise RankFailure(self._failure)
        sched_ref = ray.put(sched)  # one copy in the object store, read by every rank
        return _RayStep(self, [actor.execute.remote(sched_ref, rank == self.output_rank)
                               for rank, actor in enumerate(self._held.actors)])

    def rank_pids(self) -> list[int]:
        return [w["pid"] for w in self._where]

    def rank_nodes(self) -> list[str]:
        """The Ray node id of each rank's actor, in rank order."""
        return [w["node_id"] for w in self._where]

    def shutdown(self) -> None:
        self._finalizer()
