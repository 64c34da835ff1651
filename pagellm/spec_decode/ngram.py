"""N-gram prompt lookup: propose what followed the last occurrence-match of the context's tail.

For n from prompt_lookup_max down to prompt_lookup_min, the last n tokens are searched for
earlier in the request's own tokens (prompt + output); at the first (earliest) match the tokens
that followed it are the proposals. Input-grounded work (edit, rewrite, extract) repeats long
spans of its prompt, which is where this wins. The search is one vectorised comparison of all
windows per request (numpy), no Python loop over positions.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from pagellm.spec_decode.proposer import Proposer


class NgramProposer(Proposer):
    stateful = False
    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int) -> None:
        if not 1 <= prompt_lookup_min <= prompt_lookup_max:
            raise ValueError(f"prompt_lookup_min/max: need 1 <= min <= max, got {prompt_lookup_min}, {prompt_lookup_max}")
        self.min_n = prompt_lookup_min
        self.max_n = prompt_lookup_max

    def propose(self, histories: Sequence[Sequence[int]], num_tokens: Sequence[int],
                req_ids: Optional[Sequence[str]] = None,
                prompt_lens: Optional[Sequence[int]] = None) -> list[list[int]]:
        del req_ids, prompt_lens  # stateless: only the histories matter
        return [self._propose_one(np.asarray(h, dtype=np.int64), k) if k > 0 else []
                for h, k in zip(histories, num_tokens)]

    def _propose_one(self, tokens: np.ndarray, k: int) -> list[int]:
        length = len(tokens)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            # windows starting before the tail itself, each compared with the tail in one go
            windows = sliding_window_view(tokens[: length - 1], n)
            hits = np.flatnonzero((windows == tokens[length - n:]).all(axis=1))
            if hits.size:
                start = int(hits[0]) + n
                return tokens[start: start + k].tolist()
        return []
