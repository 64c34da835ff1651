"""The scheduler's LoRA rule (pure Python): at most `max_loras` distinct adapters among the running
requests, so every step fits the device's slots, and no request waits forever for its adapter.

Which waiting request may be admitted next, in queue order: one with no adapter, or one whose
adapter is already running or fits under the cap. The first request that does not fit blocks
every later request with an adapter (those without one still pass: they do not keep an adapter
running). So the adapters already running drain as their requests finish, and the blocked
request is admitted once a slot's worth of them has, whatever keeps arriving behind it.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

from pagellm.request import Request


def lora_id(request: Request) -> int:
    lora = request.lora_request
    return 0 if lora is None else lora.lora_int_id


class LoRAAdmission:
    def __init__(self, max_loras: int) -> None:
        if max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {max_loras}")
        self.max_loras = max_loras

    def next_admissible(self, waiting: Iterable[Request], running: Iterable[Request],
                        is_ready: Optional[Callable[[Request], bool]]) -> Optional[int]:
        """Index in `waiting` of the next request to admit, or None."""
        active = {lora_id(r) for r in running} - {0}
        blocked = False
        for i, request in enumerate(waiting):
            ident = lora_id(request)
            fits = ident == 0 or (not blocked and (ident in active or len(active) < self.max_loras))
            if not fits:
                blocked = True
                continue
            if is_ready is None or is_ready(request):
                return i
        return None

    @staticmethod
    def per_adapter(requests: Iterable[Request]) -> dict[str, int]:
        """Request counts by adapter name (metrics)."""
        counts: dict[str, int] = {}
        for request in requests:
            if request.lora_request is not None:
                name = request.lora_request.lora_name
                counts[name] = counts.get(name, 0) + 1
        return counts
