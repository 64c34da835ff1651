"""What a worker sends back for one step: plain Python data, picklable, no tensors (and no torch import),
so it can cross a process (or Ray actor) boundary as it is."""

from __future__ import annotations

from dataclasses import dataclass, field

# Per position: (token ids [chosen, top-1, ...], their logprobs, rank of the chosen token).
LogprobsLists = list[tuple[list[int], list[float], int]]


@dataclass
class ModelRunnerOutput:
    sampled_token_ids: dict[str, list[int]]  # empty list for a mid-prompt chunk
    logprobs: dict[str, LogprobsLists] = field(default_factory=dict)
    # Per prompt chunk: logprobs of prompt tokens ctx+1 .. ctx+q_len (the ones this chunk predicts).
    prompt_logprobs: dict[str, LogprobsLists] = field(default_factory=dict)
    # Speculative decoding: per request, the proposals made after this step (verified in the next).
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)
