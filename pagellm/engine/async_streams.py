"""The per-request output streams of AsyncLLM and the cross-thread plumbing that fills them.

The reader thread never touches a stream directly: it hands items to the stream's own event
loop (`call_soon_threadsafe`), where generate() drains them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Optional

from pagellm.engine.exceptions import RequestTimeoutError
from pagellm.outputs import CompletionOutput, RequestOutput


class OutputStream:
    """Outputs of one request, filled from the reader thread (via its loop), drained by generate()."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.items: list[object] = []
        self.ready = asyncio.Event()

    def put(self, item: object) -> None:  # on self.loop
        self.items.append(item)
        self.ready.set()

    async def get_all(self) -> list[object]:
        while not self.items:
            await self.ready.wait()
            self.ready.clear()
        items, self.items = self.items, []
        return items


async def wait_until(awaitable, deadline: Optional[float], request_id: str):
    """Awaits, but only until `deadline` (time.monotonic()); RequestTimeoutError after it."""
    if deadline is None:
        return await awaitable
    try:
        return await asyncio.wait_for(awaitable, max(deadline - time.monotonic(), 0.0))
    except asyncio.TimeoutError:
        raise RequestTimeoutError(f"request {request_id} ran past its deadline and was aborted") from None


def merge_deltas(outputs: list[RequestOutput]) -> RequestOutput:
    """Several DELTA outputs of one request (the consumer fell behind) as one."""
    if len(outputs) == 1:
        return outputs[0]
    merged: dict[int, CompletionOutput] = {}
    for out in outputs:
        for c in out.outputs:
            prev = merged.get(c.index)
            if prev is None:
                merged[c.index] = dataclasses.replace(
                    c, token_ids=list(c.token_ids), logprobs=list(c.logprobs) if c.logprobs is not None else None)
                continue
            prev.text += c.text
            prev.token_ids.extend(c.token_ids)
            if c.logprobs is not None:
                prev.logprobs = (prev.logprobs or []) + c.logprobs
            prev.cumulative_logprob = c.cumulative_logprob
            prev.finish_reason, prev.stop_reason = c.finish_reason, c.stop_reason
    prompt_logprobs = next((o.prompt_logprobs for o in outputs if o.prompt_logprobs is not None), None)
    return dataclasses.replace(outputs[-1], outputs=[merged[i] for i in sorted(merged)],
                               prompt_logprobs=prompt_logprobs)


def put_all(batch: list[tuple[OutputStream, object]]) -> None:
    for stream, item in batch:
        stream.put(item)


def resolve(future: asyncio.Future, value, error: Optional[BaseException]) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


def call_soon(loop: asyncio.AbstractEventLoop, callback, *args) -> None:
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        pass  # that event loop is closed: nobody is waiting there any more
