"""DeepSeek-R1 style: the chat template opens `<think>`, so the output starts inside the
reasoning; an opening tag the model writes itself is dropped. Everything up to the first
`</think>` is reasoning, the rest content."""

from pagellm.entrypoints.openai.reasoning.base import ReasoningParser


class DeepSeekR1ReasoningParser(ReasoningParser):
    names = ("deepseek_r1",)
    starts_in_reasoning = True
