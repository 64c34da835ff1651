"""Speculative decoding: configuration (proposers, verification and scheduling hooks land here)."""

from pagellm.spec_decode.config import METHODS, SpeculativeConfig

__all__ = ["METHODS", "SpeculativeConfig"]
