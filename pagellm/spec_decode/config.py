"""Speculative decoding configuration: what the user asked for, validated once.

`SpeculativeConfig.from_dict` accepts the same JSON object as `--speculative-config` and
`LLM(model, speculative_config={...})`; every bad key or value is a ValueError naming it.
Speculation is off unless a config is given.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional, Union

METHODS = ("ngram", "suffix", "draft_model")
# draft_token_cost by device. CPU: measured with SmolLM2 Q4_1 on 2 cores: the quantized matmuls are
# about half of a batch-1 step and compute-bound past one row, each more row adding ~0.4x of their
# one-row time. CUDA: small-batch decode is bound by reading the weights, so extra rows are nearly
# free (not measured on a GPU yet).
DRAFT_TOKEN_COST = {"cpu": 0.2, "cuda": 0.02}
_PREFIX = "speculative_config"


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "ngram"
    num_speculative_tokens: int = 4  # k: tokens proposed per request per step
    prompt_lookup_min: int = 1  # ngram: shortest suffix n-gram matched against the context
    prompt_lookup_max: int = 4  # ngram: longest suffix n-gram tried first
    model: Optional[str] = None  # draft_model: a model with the target's tokenizer / vocabulary
    # suffix: trie depth (longest match + continuation), finished requests whose outputs are kept
    # for matching (0: none), proposal length cap per matched token, and the lowest path
    # probability a proposed token may have.
    suffix_max_tree_depth: int = 24
    suffix_max_cached_requests: int = 1000
    suffix_max_spec_factor: float = 1.0
    suffix_min_token_prob: float = 0.1
    # Adaptive off-switches: no speculation in a step with more running decodes than this (0: never
    # switch off by batch size), nor for a request whose acceptance rate over its last
    # `acceptance_window` drafted tokens is below `min_acceptance_rate`. The default batch size is
    # measured (scripts/bench_spec.py --sweep, SmolLM2 Q4_1 on 2 CPU cores): at batch 4 speculation
    # already ran at 0.60-0.86x of plain decoding even with 60-90% acceptance, as a (k + 1)-token
    # verification forward costs ~2.7x a one-token decode on the quantized CPU kernels.
    disable_by_batch_size: int = 1
    min_acceptance_rate: float = 0.0
    acceptance_window: int = 64
    # The cost of verifying one more proposal, as a fraction of a plain decode step: each request's
    # draft length is then chosen from its acceptance so far (core/spec_scheduling.py); 0 always
    # proposes num_speculative_tokens. None: the device's default (DRAFT_TOKEN_COST).
    draft_token_cost: Optional[float] = None

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"{_PREFIX}.{name}: {why}, got {getattr(self, name)!r}")

        def positive_int(name: str, minimum: int = 1) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                bad(name, f"must be an integer >= {minimum}")

        if self.method not in METHODS:
            bad("method", f"must be one of {METHODS}")
        positive_int("num_speculative_tokens")
        positive_int("prompt_lookup_min")
        positive_int("prompt_lookup_max")
        if self.prompt_lookup_max < self.prompt_lookup_min:
            bad("prompt_lookup_max", f"must be >= prompt_lookup_min ({self.prompt_lookup_min})")
        positive_int("disable_by_batch_size", minimum=0)
        positive_int("acceptance_window")
        rate = self.min_acceptance_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
            bad("min_acceptance_rate", "must be a number in [0, 1]")
        cost = self.draft_token_cost
        if cost is not None and (isinstance(cost, bool) or not isinstance(cost, (int, float))
                                 or not 0.0 <= cost < float("inf")):
            bad("draft_token_cost", "must be a number >= 0 (or null for the device's default)")
        positive_int("suffix_max_tree_depth", minimum=2)
        positive_int("suffix_max_cached_requests", minimum=0)
        factor = self.suffix_max_spec_factor
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0.0 < factor < float("inf"):
            bad("suffix_max_spec_factor", "must be a positive number")
        prob = self.suffix_min_token_prob
        if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0.0 <= prob <= 1.0:
            bad("suffix_min_token_prob", "must be a number in [0, 1]")
        if self.method != "suffix":
            for f in fields(self):
                if f.name.startswith("suffix_") and getattr(self, f.name) != f.default:
                    bad(f.name, f"is only used by method 'suffix', not {self.method!r}")
        if self.method == "draft_model":
            if not isinstance(self.model, str) or not self.model:
                bad("model", "method 'draft_model' needs the path of a draft model")
        elif self.model is not None:
            bad("model", f"is only used by method 'draft_model', not {self.method!r}")

    @classmethod
    def from_dict(cls, data: Any) -> "SpeculativeConfig":
        if not isinstance(data, dict):
            raise ValueError(f"{_PREFIX}: must be a JSON object / dict, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        for key in data:
            if key not in known:
                raise ValueError(f"{_PREFIX}.{key}: unknown key; valid keys: {sorted(known)}")
        return cls(**data)

    @classmethod
    def parse(cls, value: Union[None, str, dict, "SpeculativeConfig"]) -> Optional["SpeculativeConfig"]:
        """None (off), a SpeculativeConfig, a dict, or its JSON text (the CLI form)."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"{_PREFIX}: not valid JSON ({e.msg} at character {e.pos})") from None
        return cls.from_dict(value)

    def resolved_draft_token_cost(self, device: str) -> float:
        return float(self.draft_token_cost) if self.draft_token_cost is not None else DRAFT_TOKEN_COST.get(device, 0.0)

    def to_dict(self) -> dict:
        return asdict(self)
