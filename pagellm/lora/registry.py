"""The front end's adapters: each LoRARequest checked once (directory, shapes, rank) before a
request naming it is queued, and the server's adapters by name (`--lora-modules`, load/unload).

Pure Python plus the adapter reader (torch + safetensors): no model code, so the front end may use it.
"""

from __future__ import annotations

import itertools
from typing import Optional

from pagellm.lora.adapter import check_adapter
from pagellm.lora.request import LoRARequest


class LoRARegistry:
    def __init__(self, config, model_config) -> None:
        self.enabled = bool(config.enable_lora)
        self.max_rank = config.max_lora_rank
        self.allow_bin = config.lora_allow_bin
        self.model_config = model_config
        self.by_id: dict[int, LoRARequest] = {}  # every adapter checked so far
        self.by_name: dict[str, LoRARequest] = {}  # the server's named adapters
        self._ids = itertools.count(1)

    def check(self, lora: Optional[LoRARequest]) -> None:
        """ValueError unless `lora` is None or a valid adapter whose id means one adapter only."""
        if lora is None:
            return
        if not isinstance(lora, LoRARequest):
            raise ValueError(f"lora_request must be a LoRARequest, got {type(lora).__name__}")
        if not self.enabled:
            raise ValueError("lora_request: this engine was started without enable_lora=True (--enable-lora)")
        known = self.by_id.get(lora.lora_int_id)
        if known is not None:
            if known != lora:
                raise ValueError(f"lora_int_id {lora.lora_int_id} already names adapter {known.lora_name!r} "
                                 f"at {known.lora_path!r}; use another id for {lora.lora_name!r}")
            return
        check_adapter(lora.lora_path, lora.lora_name, self.model_config, self.max_rank, self.allow_bin)
        self.by_id[lora.lora_int_id] = lora

    # -- named adapters (the server) --------------------------------------------------
    def add(self, name: str, path: str) -> LoRARequest:
        """Checks and names a new adapter (a fresh id, never reused); ValueError if invalid or the name is taken."""
        if name in self.by_name:
            raise ValueError(f"LoRA adapter {name!r} is already loaded")
        lora_id = next(self._ids)
        while lora_id in self.by_id:
            lora_id = next(self._ids)
        lora = LoRARequest(name, lora_id, path)
        self.check(lora)
        self.by_name[name] = lora
        return lora

    def get(self, name: str) -> Optional[LoRARequest]:
        return self.by_name.get(name)

    def remove(self, name: str) -> LoRARequest:
        lora = self.by_name.pop(name)
        self.by_id.pop(lora.lora_int_id, None)
        return lora

    def names(self) -> list[str]:
        return list(self.by_name)
