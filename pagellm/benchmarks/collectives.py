"""`pagellm bench collectives`: what tensor parallelism adds to a step, measured apart from the model.

Two costs, both paid every step at tp > 1:
- dispatch: the engine core pickles the step's SchedulerOutput and sends it down each rank's pipe;
  the rank answers an ack (measured as a round trip to a spawned echo process);
- collectives: two all-reduces of the hidden states per decoder layer (after attention's output
  projection and after the MLP's down projection) and one all-gather of the logits (measured on
  `tp` spawned gloo ranks, the same ops `distributed/communication.py` runs).
The per-step estimate is dispatch + layers x 2 all-reduces + one all-gather, for decode batches.
"""

from __future__ import annotations

import os
import pickle
import statistics
import tempfile
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class CollectiveShape:
    tokens: int  # rows in the step (decode: the batch size)
    hidden: int  # hidden size (all-reduce columns)
    vocab_shard: int  # logits columns per rank (all-gather)


def _time_us(fn, iters: int, warmup: int = 5) -> float:
    """The median of `iters` timed calls, in µs (a busy machine's scheduling noise shows in the spread)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples)


def _collective_rank(rank: int, world: int, init_method: str, shapes: list[CollectiveShape], iters: int,
                     out_path: str) -> None:
    import torch
    import torch.distributed as dist

    from pagellm.distributed.communication import tensor_parallel_all_gather, tensor_parallel_all_reduce
    from pagellm.distributed.parallel_state import destroy_parallel, init_parallel

    torch.set_num_threads(1)
    ctx = init_parallel(world, rank, world, backend="gloo", init_method=init_method)
    results = []
    try:
        for shape in shapes:
            hidden = torch.randn(shape.tokens, shape.hidden)
            logits = torch.randn(shape.tokens, shape.vocab_shard)

            def reduce() -> None:
                tensor_parallel_all_reduce(hidden.clone(), ctx)

            def gather() -> None:
                tensor_parallel_all_gather(logits, -1, ctx)

            dist.barrier(group=ctx.tp_group)
            results.append((_time_us(reduce, iters), _time_us(gather, iters)))
        if rank == 0:
            with open(out_path, "wb") as f:
                pickle.dump(results, f)
    finally:
        destroy_parallel()


def measure_collectives(tp: int, shapes: list[CollectiveShape], iters: int = 200) -> list[tuple[float, float]]:
    """Median (all-reduce µs, all-gather µs) per shape on `tp` gloo ranks of this machine."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="pagellm-coll-") as tmp:
        out_path = os.path.join(tmp, "result.pkl")
        mp.start_processes(_collective_rank, args=(tp, f"file://{tmp}/rendezvous", shapes, iters, out_path),
                           nprocs=tp, join=True, start_method="spawn")
        with open(out_path, "rb") as f:
            return pickle.load(f)


def _echo(conn) -> None:
    while True:
        msg = conn.recv()
        if msg is None:
            return
        conn.send(("ok", None))


def decode_step_output(batch: int, prompt_len: int = 128, block_size: int = 16):
    """A real decode-step SchedulerOutput for `batch` running requests (each past its prefill)."""
    from pagellm.core.kv_cache_manager import KVCacheManager
    from pagellm.core.scheduler import Scheduler
    from pagellm.request import Request
    from pagellm.sampling_params import SamplingParams

    blocks = batch * (prompt_len // block_size + 4)
    sched = Scheduler(KVCacheManager(blocks, block_size, False), max_num_seqs=batch,
                      max_num_batched_tokens=batch * prompt_len, max_model_len=prompt_len + 64,
                      enable_chunked_prefill=True)
    for i in range(batch):
        sched.add_request(Request(f"r{i}", list(range(1 + i, prompt_len + 1 + i)), SamplingParams(max_tokens=32)))
    prefill = sched.schedule()
    sched.update_from_output(prefill, {req_id: [7] for req_id in prefill.num_scheduled_tokens}, None, None)
    return sched.schedule()


def measure_dispatch(batches: list[int], iters: int = 200) -> list[tuple[int, float]]:
    """Per decode batch: (pickled SchedulerOutput bytes, median pipe round trip µs to one rank)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_echo, args=(child,), daemon=True)
    proc.start()
    results = []
    try:
        for batch in batches:
            out = decode_step_output(batch)
            msg = ("execute_model", (out,), {}, False)

            def round_trip() -> None:
                parent.send(msg)
                parent.recv()

            results.append((len(pickle.dumps(msg)), _time_us(round_trip, iters)))
    finally:
        parent.send(None)
        proc.join(timeout=5)
    return results


def run(tp: int, batches: list[int], hidden: int, vocab: int, layers: int, iters: int) -> dict:
    from pagellm.distributed.layout import padded_vocab_size

    shapes = [CollectiveShape(b, hidden, padded_vocab_size(vocab, tp) // tp) for b in batches]
    coll = measure_collectives(tp, shapes, iters)
    dispatch = measure_dispatch(batches, iters)
    return {"tp": tp, "hidden": hidden, "vocab": vocab, "layers": layers,
            "rows": step_rows(batches, coll, dispatch, layers)}


def step_rows(batches: list[int], coll: list[tuple[float, float]], dispatch: list[tuple[int, float]],
              layers: int) -> list[dict]:
    """One row per batch: the measured pieces and the step they add up to (2 all-reduces a layer)."""
    rows = []
    for batch, (reduce_us, gather_us), (size, rtt_us) in zip(batches, coll, dispatch):
        rows.append({"batch": batch, "all_reduce_us": reduce_us, "all_gather_logits_us": gather_us,
                     "dispatch_bytes": size, "dispatch_round_trip_us": rtt_us,
                     "per_step_us": rtt_us + layers * 2 * reduce_us + gather_us})
    return rows


def format_table(result: dict) -> str:
    lines = [f"tp={result['tp']}  hidden={result['hidden']}  vocab={result['vocab']}  layers={result['layers']}  "
             "(medians, gloo on this machine's cores)",
             f"{'batch':>6} {'all-reduce µs':>14} {'gather µs':>10} {'dispatch B':>11} {'dispatch µs':>12} "
             f"{'per step µs':>12}"]
    for r in result["rows"]:
        lines.append(f"{r['batch']:>6} {r['all_reduce_us']:>14.1f} {r['all_gather_logits_us']:>10.1f} "
                     f"{r['dispatch_bytes']:>11} {r['dispatch_round_trip_us']:>12.1f} {r['per_step_us']:>12.1f}")
    return "\n".join(lines)


def cmd_collectives(args) -> int:
    from pagellm.benchmarks.results import write_result

    result = run(args.tp, args.batch_sizes, args.hidden_size, args.vocab_size, args.num_layers, args.num_iters)
    print(format_table(result))
    config = {k: getattr(args, k) for k in ("tp", "batch_sizes", "hidden_size", "vocab_size", "num_layers",
                                            "num_iters")}
    path = write_result(args.result_dir, "collectives", config, result, args.result_name)
    print(f"result: {path}")
    return 0


def register(bsub, comma_ints, add_result_args) -> None:
    p = bsub.add_parser("collectives", help="the per-step cost tensor parallelism adds: dispatch and collectives")
    p.add_argument("--tp", type=int, default=2, help="ranks (gloo processes on this machine)")
    p.add_argument("--batch-sizes", type=comma_ints, default=[1, 16, 64], help="decode batch sizes")
    # SmolLM2-135M's numbers by default.
    p.add_argument("--hidden-size", type=int, default=576)
    p.add_argument("--vocab-size", type=int, default=49152)
    p.add_argument("--num-layers", type=int, default=30)
    p.add_argument("--num-iters", type=int, default=200)
    add_result_args(p)
    p.set_defaults(func=cmd_collectives)

