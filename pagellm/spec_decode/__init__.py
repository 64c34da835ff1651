"""Speculative decoding: configuration, proposers (`factory.make_proposer`), the rejection sampler and
the model runner's verification step (`verify.py`)."""

from pagellm.spec_decode.config import METHODS, SpeculativeConfig

__all__ = ["METHODS", "SpeculativeConfig"]
