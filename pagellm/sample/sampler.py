"""Turns one step's logits into next tokens (and their logprobs), batched over requests.

The model runner hands over one float32 row of logits per request that samples this step,
plus a `SamplingMetadata` for those rows (`pagellm/sample/metadata.py`). Everything below works on
the whole batch at once; Python only loops over rows while building the metadata.

Order of operations (vLLM v1 / OpenAI / Hugging Face meanings):

1. Logprobs are taken from the RAW logits (`log_softmax` in float32), before any processing,
   as vLLM does by default. The rank of a token is 1 + the number of tokens with a strictly
   higher logprob (1 = most likely).
2. Logits processors, in this order:
   - `logit_bias`: the bias is added to the token's logit.
   - `allowed_token_ids`: every other token is set to -inf.
   - `bad_words` (token-id sequences in `params.bad_words_token_ids`): a single-token bad word
     is always banned; for a longer one, its last token is banned when the output so far ends
     with the rest of it. Only the generated output is matched, not the prompt.
   - `min_tokens`: while fewer than `min_tokens` tokens have been generated, the EOS ids
     (unless `ignore_eos`) and `stop_token_ids` are banned.
   - `repetition_penalty` (HF/CTRL): for every token seen in the prompt OR the output, a positive
     logit is divided by the penalty, a negative one multiplied by it.
   - `frequency_penalty`: minus `count_in_output * frequency_penalty`.
   - `presence_penalty`: minus `presence_penalty` if the token occurs in the output.
   A grammar's mask (structured outputs) is already in the logits: the model runner sets the
   tokens it forbids to -inf before sampling (`structured_output/bitmask.py`), and nothing above
   can revive an -inf.
3. Greedy rows (`temperature < 1e-5` or `top_k == 1`) take the argmax of the processed logits
   (the first index on ties, so `top_k=1` and `temperature=0` agree exactly).
4. Other rows: divide by `temperature`; `top_k` keeps the tokens whose logit is >= the k-th
   largest (ties at the boundary are kept, as in HF); `top_p` keeps the smallest prefix of the
   distribution left by top-k, sorted by probability, whose mass reaches `top_p` (the top token
   always stays; tokens tied with the last one kept stay too); `min_p` drops tokens whose
   probability is below `min_p * max_probability`. Then one token is drawn by the exponential
   race `argmax(probs / q)`, with `q ~ Exp(1)` (drawn as `-log(U)`, `U ~ Uniform[0, 1)`) for
   every vocabulary entry, which picks token i with probability `probs[i] / sum(probs)`. A row
   whose request has a seed draws its `q` from its own generator (on the logits' device), so a
   seeded request gets the same tokens whatever else shares the batch. Greedy rows draw
   nothing, so they never advance a generator.

Token ids in `logit_bias` / `allowed_token_ids` outside the vocabulary are a `ValueError`;
EOS / stop / bad-word ids past the logits width are ignored (they cannot be sampled anyway).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from pagellm.sample.logprobs import LogprobsTensors, compute_logprobs_tensors
from pagellm.sample.metadata import SamplingMetadata
from pagellm.sample.ops import apply_logits_processors, apply_min_p, apply_top_k, apply_top_p


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [B] long
    logprobs: Optional[LogprobsTensors]  # when any row asked for logprobs (K = the largest request)


class Sampler(torch.nn.Module):
    """logits [B, V] + SamplingMetadata -> one token per row (and logprobs when asked).

    Speculative decoding does not draw here for its draft positions: `distributions` gives the
    processed logits and the random rows' normalized probabilities (the same processors and
    truncation as `forward`), which `pagellm/spec_decode/verify.py` hands to the rejection sampler.
    Rows without drafts in the same step still go through `forward`.
    """

    def forward(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        self._check(logits, meta)
        raw = logits.float()
        processed = apply_logits_processors(raw, meta)

        if meta.all_greedy:
            sampled = processed.argmax(dim=-1)
        elif meta.all_random:
            sampled = self._sample_random(processed, meta)
        else:
            sampled = processed.argmax(dim=-1)
            random_part = processed[meta.random_rows]
            sampled[meta.random_rows] = self._sample_random(random_part, meta)

        logprobs = None
        if meta.max_num_logprobs is not None:
            logprobs = compute_logprobs_tensors(raw, sampled, meta.max_num_logprobs)
        return SamplerOutput(sampled_token_ids=sampled, logprobs=logprobs)

    def distributions(self, logits: torch.Tensor, meta: SamplingMetadata) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """What `forward` would draw from, without drawing: the processed logits of every row (a
        greedy row takes their argmax) and, for the random rows (`meta.random_rows`, or all rows
        when `all_random`), the probabilities after temperature / top-k / top-p / min-p,
        normalized. None when every row is greedy."""
        self._check(logits, meta)
        processed = apply_logits_processors(logits.float(), meta)
        if meta.all_greedy:
            return processed, None
        random_part = processed if meta.all_random else processed[meta.random_rows]
        probs = self._truncated_probs(random_part, meta)
        return processed, probs / probs.sum(dim=-1, keepdim=True)

    @staticmethod
    def _check(logits: torch.Tensor, meta: SamplingMetadata) -> None:
        if logits.dim() != 2 or logits.shape[0] != meta.num_rows or logits.shape[1] != meta.vocab_size:
            raise ValueError(
                f"Sampler: logits shape {tuple(logits.shape)} does not match the metadata "
                f"({meta.num_rows} rows, vocab {meta.vocab_size})"
            )

    @classmethod
    def _sample_random(cls, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """Temperature, top-k, top-p, min-p and the exponential race, over the random rows only."""
        probs = cls._truncated_probs(logits, meta)
        # argmax(p / q) with q ~ Exp(1) picks token i with probability p_i / sum(p), so the row
        # needs no renormalisation after truncation. q = -log(U), U ~ Uniform[0, 1), is Exp(1);
        # on CPU it is several times faster than `exponential_`.
        q = torch.empty_like(probs)
        if len(meta.generators) < q.shape[0]:
            q.uniform_()
        for j, gen in meta.generators:
            q[j].uniform_(generator=gen)
        q.log_().neg_()
        # Guard against a draw of exactly 0 (0/0 = nan would win the argmax).
        q.clamp_min_(torch.finfo(q.dtype).tiny)
        return (probs / q).argmax(dim=-1)

    @staticmethod
    def _truncated_probs(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """The random rows' probabilities after temperature and truncation (not renormalized)."""
        logits = logits / meta.temperature.unsqueeze(-1)
        rows = meta.trunc_rows  # None: top-k/top-p apply to every random row
        if meta.top_k is not None:
            if rows is None:
                logits = apply_top_k(logits, meta.top_k, meta.max_top_k)
            else:
                logits[rows] = apply_top_k(logits[rows], meta.top_k, meta.max_top_k)
        probs = logits.softmax(dim=-1)
        if meta.top_p is not None:
            if rows is None:
                probs = apply_top_p(probs, meta.top_p)
            else:
                probs[rows] = apply_top_p(probs[rows], meta.top_p)
        if meta.min_p is not None:
            probs = apply_min_p(probs, meta.min_p)
        return probs
