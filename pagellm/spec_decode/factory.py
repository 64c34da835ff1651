"""The proposer a speculative config names, built once by the model runner that samples.

Each method's module is imported only when chosen: the draft model pulls in a second worker,
the others are pure Python.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from pagellm.spec_decode.config import SpeculativeConfig
from pagellm.spec_decode.proposer import Proposer


def make_proposer(spec_config: SpeculativeConfig, engine_config, *,
                  target_vocab_size: Optional[int] = None) -> Proposer:
    """`engine_config`: the target's resolved EngineConfig (the draft model builds its worker
    from it); `target_vocab_size`: the target's vocabulary, so the draft need not re-read its config."""
    method = spec_config.method
    if method == "ngram":
        from pagellm.spec_decode.ngram import NgramProposer

        return NgramProposer(spec_config.prompt_lookup_min, spec_config.prompt_lookup_max)
    if method == "suffix":
        from pagellm.spec_decode.suffix import SuffixProposer

        return SuffixProposer.from_config(spec_config)
    if method == "draft_model":
        from pagellm.spec_decode.draft_model import DraftModelProposer

        # The draft's own runner must not build a proposer of its own (DraftModelProposer clears
        # it too; done here as well so no caller can recurse through this function).
        inner = dataclasses.replace(engine_config, speculative_config=None)
        return DraftModelProposer(inner, spec_config, target_vocab_size=target_vocab_size)
    raise ValueError(f"speculative_config.method: no proposer for {method!r}")
