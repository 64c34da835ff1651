"""Executors: how the engine core reaches its workers. SchedulerOutput goes in, ModelRunnerOutput comes out."""

from pagellm.executor.base import Executor, RankFailure
from pagellm.executor.multiproc import MultiprocExecutor
from pagellm.executor.uniproc import UniprocExecutor

__all__ = ["Executor", "MultiprocExecutor", "RankFailure", "UniprocExecutor"]
