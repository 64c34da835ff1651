"""The interface every grammar backend implements, and the shared bitmask format.

A backend compiles a constraint once (`compile`, thread-safe, slow) into a grammar; each request
gets its own `Matcher` from it. Per step the manager asks each constrained row's matcher to
fill its row of a packed int32 bitmask (bit i of word i // 32: token i allowed), which the
sampler turns into -inf on the disallowed logits; after sampling, matchers accept the tokens.
Both xgrammar and llguidance use this layout, so one mask tensor serves either.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from pagellm.structured_output.params import StructuredOutputsParams


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """All tokens allowed (-1 is every bit set): rows without a grammar stay unconstrained."""
    return torch.full((rows, bitmask_words(vocab_size)), -1, dtype=torch.int32)


def bitmask_to_bool(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[rows, words] int32 -> [rows, vocab_size] bool (True: allowed)."""
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = (bitmask.unsqueeze(-1) >> bits) & 1
    return allowed.flatten(1)[:, :vocab_size].bool()


class Matcher(Protocol):
    def accept_token(self, token_id: int) -> bool:
        """Advances on a sampled token; False if the grammar does not allow it (the request then fails)."""

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Writes the allowed next tokens into `bitmask[row]`."""

    def is_terminated(self) -> bool:
        """The grammar is complete (and, for constraints that need it, its stop token was accepted)."""

    def rollback(self, num_tokens: int) -> None:
        """Undoes the last accepted tokens (speculative decoding)."""

    def reset(self) -> None:
        """Back to the start (a preempted request recomputing from its prompt keeps its tokens; the
        manager replays them)."""


class GrammarBackend(Protocol):
    name: str

    def compile(self, params: StructuredOutputsParams) -> Any:
        """The compiled constraint; ValueError naming the problem if it is invalid or unsupported."""

    def matcher(self, compiled: Any) -> Matcher:
        ...
