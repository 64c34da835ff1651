"""Grammar-constrained decoding: constraints (`StructuredOutputsParams`), grammar backends
(xgrammar, llguidance) behind one interface, and the manager that compiles them off the step
and fills each step's token bitmask."""

from pagellm.structured_output.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
