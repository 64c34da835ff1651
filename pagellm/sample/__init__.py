"""Sampling: per-step metadata (kept across steps by the runner), logits processors, logprobs, the sampler."""

from pagellm.sample.logprobs import LogprobsTensors, compute_logprobs_tensors, rows_to_lists
from pagellm.sample.metadata import SamplingMetadata, SamplingMetadataBuilder, SamplingRow
from pagellm.sample.sampler import Sampler, SamplerOutput

__all__ = [
    "LogprobsTensors", "Sampler", "SamplerOutput", "SamplingMetadata", "SamplingMetadataBuilder",
    "SamplingRow", "compute_logprobs_tensors", "rows_to_lists",
]
