"""What a tensor-parallel test rank runs: kept apart from the test module so the spawned ranks
import only pagellm and torch. Every case also runs in the test process at tp 1 as the reference."""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.multiprocessing as mp

from pagellm.attention.backend import build_metadata
from pagellm.attention.layer import Attention
from pagellm.attention.torch_backend import TorchAttentionBackend
from pagellm.distributed.communication import broadcast_object, tensor_parallel_all_gather
from pagellm.distributed.parallel_state import destroy_parallel, get_parallel_context, init_parallel, set_parallel_context
from pagellm.forward_context import set_forward_context
from pagellm.layers.embedding import LMHead, VocabEmbedding
from pagellm.layers.linear import Linear, MergedLinear, ParallelStyle, cpu_prepack_available
from pagellm.loader import iter_weights, resolve_model_source
from pagellm.loader.hf import load_hf_config
from pagellm.models.registry import get_model_class
from pagellm.worker.model_loader import model_weight_bytes

BLOCK = 16
PROMPTS = [[5, 17, 3, 99, 42, 7, 250, 11, 1, 8, 64, 33, 2, 19, 200, 77, 4, 6], [1, 2, 3], [9, 8, 7, 6, 5, 4, 3]]


# -- running ranks ---------------------------------------------------------------------

def _rank_main(rank: int, tp_size: int, out_dir: str, cases: list[tuple[str, tuple]]) -> None:
    torch.set_num_threads(1)
    ctx = init_parallel(tp_size, rank, tp_size, backend="gloo", init_method=f"file://{out_dir}/rendezvous")
    try:
        with set_parallel_context(ctx):
            results = [CASES[name](*args) for name, args in cases]
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        destroy_parallel()


def run_ranks(tmp_path, tp_size: int, cases: list[tuple[str, tuple]]) -> list[list]:
    """Runs every case on `tp_size` gloo ranks (one spawn for all of them); per rank, the results."""
    out_dir = str(tmp_path / f"tp{tp_size}")
    os.makedirs(out_dir)
    # forkserver: ranks fork from one single-threaded server that imported torch and pagellm once
    # (a fresh interpreter per rank costs seconds each; forking pytest itself copies its threads).
    mp.set_forkserver_preload(["tests.tp_ranks"])
    mp.start_processes(_rank_main, args=(tp_size, out_dir, cases), nprocs=tp_size, join=True,
                       start_method="forkserver")
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(tp_size)]


# -- what a rank computes (also run in the test process at tp 1 for the reference) ---------

def _seeded(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def layers_case() -> dict:
    """Column / row / merged linears and the vocab-parallel embedding and heads on fixed weights."""
    ctx = get_parallel_context()
    x = _seeded(7, 12, seed=1)  # 7 rows: nothing about the split depends on the row count
    out: dict = {}
    column = Linear(12, 10, bias=True, parallel_style=ParallelStyle.COLUMN)
    column.load("weight", _seeded(10, 12, seed=2))
    column.load("bias", _seeded(10, seed=3))
    out["column"] = tensor_parallel_all_gather(column(x), -1)
    row = Linear(12, 10, bias=True, parallel_style=ParallelStyle.ROW)
    row.load("weight", _seeded(10, 12, seed=4))
    row.load("bias", _seeded(10, seed=5))
    part = 12 // ctx.tp_size
    out["row"] = row(x[:, ctx.tp_rank * part:(ctx.tp_rank + 1) * part])
    if cpu_prepack_available(torch.float32):  # the CPU default: the bias still comes after the reduce
        row.prepack_for_cpu()
        out["row_packed"] = row(x[:, ctx.tp_rank * part:(ctx.tp_rank + 1) * part])
    # q: 4 heads of 2; k/v: 1 head, replicated on every rank. Loaded per projection and fused.
    sizes = {"q": 8, "k": 2, "v": 2}
    weights = {s: _seeded(n, 12, seed=6 + i) for i, (s, n) in enumerate(sizes.items())}
    for mode in ("shards", "fused"):
        qkv = MergedLinear(12, sizes, bias=False, parallel_style=ParallelStyle.COLUMN,
                           shard_replicas={"k": ctx.tp_size, "v": ctx.tp_size})
        if mode == "shards":
            for s, w in weights.items():
                qkv.load_shard(s, "weight", w)
        else:
            qkv.load("weight", torch.cat(list(weights.values())))
        q, k, v = qkv.split(qkv(x))
        out[f"qkv_{mode}"] = (tensor_parallel_all_gather(q, -1), k, v)
    ids = torch.tensor([0, 50, 25, 26, 1, 49, 24])  # both sides of the split, the last id
    embed = VocabEmbedding(51, 6)  # 51 rows: padded at tp 2
    embed.load("weight", _seeded(51, 6, seed=10))
    untied = LMHead(51, 6)
    untied.load("weight", _seeded(51, 6, seed=11))
    hidden = _seeded(7, 6, seed=12)
    out["embed"] = embed(ids)
    out["tied_head"] = LMHead(51, 6, tied_to=embed)(hidden)
    out["untied_head"] = untied(hidden)
    out["broadcast"] = broadcast_object({"from": ctx.tp_rank, "ids": [1, 2]})  # rank 0's, everywhere
    return out


def _build(path: str) -> torch.nn.Module:
    source = resolve_model_source(path)
    config = load_hf_config(source)
    model = get_model_class(config)(config, 128)
    # Ranks read only their part of each tensor (as the workers do).
    model.load_weights(iter_weights(source, torch.float32, lazy=get_parallel_context().tp_size > 1))
    return model.eval()


@torch.no_grad()
def model_case(path: str) -> dict:
    """A ragged prefill of every prompt, then one decode step of each argmax (through the cache)."""
    model = _build(path)
    backend = TorchAttentionBackend()
    block_ids, num_blocks = [], 0
    for p in PROMPTS:
        n = -(-(len(p) + 1) // BLOCK)
        block_ids.append(list(range(num_blocks, num_blocks + n)))
        num_blocks += n
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    for a in attns:
        a.kv_cache = torch.zeros(2, num_blocks, BLOCK, a.num_kv_heads, a.head_dim)
        a.backend = backend
    lens = [len(p) for p in PROMPTS]
    ids = torch.tensor([t for p in PROMPTS for t in p])
    positions = torch.cat([torch.arange(n) for n in lens])
    with set_forward_context(build_metadata(lens, [0] * len(lens), block_ids, BLOCK, torch.device("cpu"))):
        prefill = model.compute_logits(model(ids, positions))
    last = torch.tensor(lens).cumsum(0) - 1
    next_ids = prefill[last].argmax(-1)
    with set_forward_context(build_metadata([1] * len(lens), lens, block_ids, BLOCK, torch.device("cpu"))):
        decode = model.compute_logits(model(next_ids, torch.tensor(lens)))
    for a in attns:
        a.kv_cache = None
    return {"prefill": prefill, "decode": decode, "kv_heads": attns[0].num_kv_heads,
            "weight_bytes": model_weight_bytes(model)}


def expert_parallel_model_case(path: str) -> dict:
    """model_case with whole experts per rank (enable_expert_parallel); also the experts this rank holds."""
    with set_parallel_context(dataclasses.replace(get_parallel_context(), expert_parallel=True)):
        out = model_case(path)
        from pagellm.layers.moe import SparseMoE
        moe = next(m for m in _build(path).modules() if isinstance(m, SparseMoE))
    out["experts"] = (moe.expert_range.start, moe.expert_range.size, tuple(moe.w13.shape))
    return out


CASES = {"layers": layers_case, "model": model_case, "model_ep": expert_parallel_model_case}
