"""One worker in this process: the executor for a single device."""

from __future__ import annotations

from typing import Any, Optional

from pagellm.core.scheduler import SchedulerOutput
from pagellm.executor.base import Executor
from pagellm.worker.outputs import ModelRunnerOutput
from pagellm.worker.worker import Worker


class UniprocExecutor(Executor):
    def __init__(self, setup) -> None:
        super().__init__(setup.config)
        self.worker = Worker(setup.config, setup.model_config, rank=0)
        self.worker.load_model(setup.source)

    @property
    def driver_worker(self) -> Worker:
        return self.worker

    def collective_rpc(self, method: str, args: tuple = (), kwargs: Optional[dict] = None) -> list[Any]:
        return [getattr(self.worker, method)(*args, **(kwargs or {}))]

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self.worker.execute_model(sched)
