"""What a worker sends back for one step: plain Python data, picklable, no tensors (and no torch import),
so it can cross a process (or Ray actor) boundary as it is."""

from __future__ import annotations

from dataclasses import dataclass, field

# Per position: (token ids [chosen, top-1, ...], their logprobs, rank of the chosen token).
LogprobsLists = list[tuple[list[int], list[float], int]]


@dataclass
class ModelRunnerOutput:
    # Empty list for a mid-prompt chunk; one token per sampling row, or with speculative drafts the
    # accepted drafts then the recovered/bonus token (1 .. k + 1 tokens).
    sampled_token_ids: dict[str, list[int]]
    logprobs: dict[str, LogprobsLists] = field(default_factory=dict)  # one entry per emitted token
    # Per prompt chunk: logprobs of prompt tokens ctx+1 .. ctx+q_len (the ones this chunk predicts).
    prompt_logprobs: dict[str, LogprobsLists] = field(default_factory=dict)
    # Speculative decoding: request id -> the proposer's next drafts (for the requests the scheduler
    # asked proposals for; may be shorter than asked, or empty).
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)
