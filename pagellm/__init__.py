"""pagellm: a paged-KV-cache, continuous-batching LLM inference engine."""

from typing import TYPE_CHECKING

from pagellm.config import EngineConfig
from pagellm.outputs import CompletionOutput, Logprob, RequestOutput
from pagellm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagellm.entrypoints.llm import LLM

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "EngineConfig", "RequestOutput", "CompletionOutput", "Logprob", "__version__"]


def __getattr__(name: str):
    # `LLM` brings the model stack; importing any pagellm module (the server's front end) must not.
    if name == "LLM":
        from pagellm.entrypoints.llm import LLM

        return LLM
    raise AttributeError(f"module 'pagellm' has no attribute {name!r}")
