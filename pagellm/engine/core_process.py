"""The engine core off the event loop: its step loop and two ways to run it.

The messages it speaks (plain dataclasses) are in engine/core_interface.py.

`ProcessCoreClient` runs the loop in a child process (multiprocessing "spawn", pickled
dataclasses over two one-way pipes); `ThreadCoreClient` runs the same loop in a thread of
this process (tests, comparisons). Both hand every core message to a callback on a
dedicated reader thread, so the caller's event loop never blocks on the core.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import threading
import traceback
from typing import TYPE_CHECKING, Callable, Optional

from pagellm.engine.core_interface import (  # noqa: F401 - the messages, re-exported for the front end
    AbortRequests,
    AddRequest,
    CoreFailed,
    CoreOutputs,
    CoreReady,
    CoreStartupFailed,
    FinishOnStop,
    ResetPrefixCache,
    Shutdown,
    StatsRequest,
    admit_all_or_none,
)
from pagellm.engine.setup import ModelSetup

if TYPE_CHECKING:  # the front end imports this module; only the core process loads the model stack
    from pagellm.engine.core import EngineCore


# -- the loop -------------------------------------------------------------------------------
class CoreLoop:
    """Drains input, steps while there is work, reports each iteration; blocks when idle."""

    def __init__(self, core: EngineCore, inputs: "queue.Queue", send: Callable[[object], None],
                 engine_index: int = 0) -> None:
        self.core = core
        self.inputs = inputs
        self.send = send
        self.engine_index = engine_index  # data-parallel rank, stamped on every CoreOutputs

    def run(self) -> None:
        while True:
            # Idle: sleep on the input queue (no busy spin). Busy: only take what is already there.
            messages = self._drain(block=not self.core.has_unfinished_requests())
            out = CoreOutputs([], self.core.stats(), engine_index=self.engine_index)
            for message in messages:
                if isinstance(message, Shutdown):
                    return
                self._handle(message, out)
            # Also run when nothing is scheduled: the runner drops state of requests aborted above.
            out.updates = self.core.step()
            out.stats = self.core.stats()
            out.first_scheduled = self.core.take_first_scheduled()
            self.send(out)

    def _drain(self, block: bool) -> list:
        messages = [self.inputs.get()] if block else []
        while True:
            try:
                messages.append(self.inputs.get_nowait())
            except queue.Empty:
                return messages

    def _handle(self, message, out: CoreOutputs) -> None:
        if isinstance(message, AddRequest):
            try:
                admit_all_or_none(message.children, self.core.add_request, self.core.abort_requests)
            except ValueError as e:
                out.rejected.append((message.request_id, str(e)))
            else:
                out.added.append(message.request_id)
        elif isinstance(message, AbortRequests):
            self.core.abort_requests(message.core_request_ids)
        elif isinstance(message, FinishOnStop):
            for core_id, stop in message.stops:
                self.core.finish_on_stop_string(core_id, stop)
        elif isinstance(message, StatsRequest):
            out.stats_tokens.append(message.token)
        elif isinstance(message, ResetPrefixCache):
            # After this batch's aborts, before its new requests are scheduled.
            out.reset_results.append((message.token, self.core.reset_prefix_cache()))
        else:
            raise TypeError(f"unknown message for the engine core: {type(message).__name__}")


# -- running it in a child process --------------------------------------------------------
def run_core_process(setup: ModelSetup, conn_in, conn_out, dp_rank: int = 0,
                     cuda_visible_devices: Optional[str] = None) -> None:
    """Entry point of the engine core process (`dp_rank`: its data-parallel rank)."""
    # Ctrl-C reaches the whole process group; the front end decides how to shut down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if cuda_visible_devices is not None:
        # Before anything initializes CUDA: this core and its rank processes see only their devices.
        os.environ["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
    if setup.config.device == "cpu" and setup.config.data_parallel_size > 1:
        _share_cpu_threads(setup.config.data_parallel_size)
    from pagellm.engine.core import EngineCore

    try:
        # quiet: the front end prints the KV capacity line (once), from CoreReady.
        core = EngineCore.from_config(setup, quiet=True)
    except BaseException as e:  # noqa: BLE001 - every start-up failure goes back to the front end
        conn_out.send(CoreStartupFailed(_picklable(e), traceback.format_exc()))
        return
    conn_out.send(CoreReady(core.kv_cache_summary, core.num_blocks))
    inputs: queue.Queue = queue.Queue()
    # A pump thread keeps the pipe drained while the loop steps, so the front end never blocks on a send.
    threading.Thread(target=_pump, args=(conn_in, inputs), name="pagellm-core-input", daemon=True).start()
    try:
        CoreLoop(core, inputs, conn_out.send, engine_index=dp_rank).run()
    except (BrokenPipeError, ConnectionResetError, EOFError):
        return  # the front end is gone; nobody to report to
    except BaseException as e:  # noqa: BLE001
        try:
            conn_out.send(CoreFailed(f"{type(e).__name__}: {e}", traceback.format_exc()))
        except OSError:
            pass
        raise


def _share_cpu_threads(num_cores: int) -> None:
    """Data-parallel cores on one CPU split its threads (an OMP_NUM_THREADS the user set wins)."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    import torch

    threads = max(1, torch.get_num_threads() // num_cores)
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # this core's tp/pp rank processes split it further


def _pump(conn_in, inputs: queue.Queue) -> None:
    while True:
        try:
            message = conn_in.recv()
        except (EOFError, OSError):
            # The front end closed its end or died: stop the core rather than outlive it.
            inputs.put(Shutdown())
            return
        inputs.put(message)
        if isinstance(message, Shutdown):
            return


def _picklable(error: BaseException) -> BaseException:
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(error).__name__}: {error}")


class ProcessCoreClient:
    """The front end's handle on an engine core in a child process."""

    def __init__(self, setup: ModelSetup, dp_rank: int = 0, cuda_visible_devices: Optional[str] = None) -> None:
        """dp_rank / cuda_visible_devices: set by the data-parallel client for each of its cores."""
        # spawn, not fork: a fresh interpreter that inherits only the two pipe ends passed to it
        # (no server sockets, no torch thread pools or locks copied mid-use).
        ctx = multiprocessing.get_context("spawn")
        child_in, self._to_core = ctx.Pipe(duplex=False)
        self._from_core, child_out = ctx.Pipe(duplex=False)
        name = "pagellm-engine-core" if dp_rank == 0 else f"pagellm-engine-core-{dp_rank}"
        self._process = ctx.Process(target=run_core_process,
                                    args=(setup, child_in, child_out, dp_rank, cuda_visible_devices),
                                    name=name, daemon=True)
        self._process.start()
        # Drop our copies of the child's ends: EOF on a pipe then means the other side is gone.
        child_in.close()
        child_out.close()
        self._send_lock = threading.Lock()
        self._reader: Optional[threading.Thread] = None
        self._failure: Optional[str] = None

    @property
    def pid(self) -> Optional[int]:
        return self._process.pid

    def wait_ready(self) -> CoreReady:
        """Blocks until the child has loaded the model; raises the child's start-up error."""
        while not self._from_core.poll(0.2):
            if not self._process.is_alive():
                if self._from_core.poll(0):
                    break  # it wrote its answer and exited
                raise RuntimeError(f"the engine core process exited with code {self._process.exitcode} "
                                   "before it was ready")
        try:
            message = self._from_core.recv()
        except EOFError:
            self._process.join(5)
            raise RuntimeError(f"the engine core process exited with code {self._process.exitcode} "
                               "before it was ready") from None
        if isinstance(message, CoreStartupFailed):
            self._process.join(10)
            error = message.error
            error.add_note("(raised in the engine core process while loading the model)")
            raise error
        assert isinstance(message, CoreReady), message
        return message

    def start_reader(self, on_message: Callable[[object], None], on_exit: Callable[[str], None]) -> None:
        def read() -> None:
            while True:
                try:
                    message = self._from_core.recv()
                except (EOFError, OSError):
                    break
                if isinstance(message, CoreFailed):
                    self._failure = message.message
                on_message(message)
            self._process.join(5)
            on_exit(self._failure or f"the engine core process exited (exit code {self._process.exitcode})")

        self._reader = threading.Thread(target=read, name="pagellm-core-output", daemon=True)
        self._reader.start()

    def send(self, message) -> None:
        with self._send_lock:
            self._to_core.send(message)

    def close(self, timeout: float = 10.0) -> None:
        try:
            self.send(Shutdown())
        except (OSError, ValueError):
            pass  # already gone
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout)
        self._to_core.close()
        self._from_core.close()
        self._process.close()


class ThreadCoreClient:
    """The same core loop on a thread of this process (the model step releases the GIL in torch)."""

    _CLOSED = object()

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self._inputs: queue.Queue = queue.Queue()
        self._outputs: queue.Queue = queue.Queue()
        self._core_thread = threading.Thread(target=self._run_core, name="pagellm-engine-core", daemon=True)
        self._reader: Optional[threading.Thread] = None
        self._failure: Optional[str] = None

    def _run_core(self) -> None:
        try:
            CoreLoop(self.core, self._inputs, self._outputs.put).run()
        except BaseException as e:  # noqa: BLE001 - reported to the front end, which fails its requests
            self._outputs.put(CoreFailed(f"{type(e).__name__}: {e}", traceback.format_exc()))
        finally:
            self._outputs.put(self._CLOSED)

    def start_reader(self, on_message: Callable[[object], None], on_exit: Callable[[str], None]) -> None:
        def read() -> None:
            while True:
                message = self._outputs.get()
                if message is self._CLOSED:
                    break
                if isinstance(message, CoreFailed):
                    self._failure = message.message
                on_message(message)
            on_exit(self._failure or "the engine core thread stopped")

        self._core_thread.start()
        self._reader = threading.Thread(target=read, name="pagellm-core-output", daemon=True)
        self._reader.start()

    def send(self, message) -> None:
        if not self._core_thread.is_alive():
            raise BrokenPipeError("the engine core thread is not running")
        self._inputs.put(message)

    def close(self, timeout: float = 10.0) -> None:
        self._inputs.put(Shutdown())
        if self._core_thread.is_alive():
            self._core_thread.join(timeout)
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout)

