"""The worker's adapters: `max_loras` slots on the device, `max_cpu_loras` adapters in host memory.

Each step the runner asks for the slots of the step's adapters (`prepare_step`). An adapter not
resident is copied into a free slot, or into the least recently used slot no request of this step
needs (a swap); one not in host memory is read from its directory first (the host cache evicts its
least recently used adapter). The scheduler never puts more than `max_loras` distinct adapters
in a step, so a slot can always be found.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Optional, Sequence

import torch

from pagellm.lora.adapter import LM_HEAD_MODULE, LoRAAdapter, load_adapter
from pagellm.lora.layers import attach_lora
from pagellm.lora.ops import LoRAMapping, build_mapping
from pagellm.lora.request import LoRARequest

logger = logging.getLogger(__name__)


class LoRAManager:
    def __init__(self, model: torch.nn.Module, model_config, *, max_loras: int, max_lora_rank: int,
                 max_cpu_loras: int, dtype: torch.dtype, device: torch.device, allow_bin: bool = False) -> None:
        self.model_config = model_config
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.max_cpu_loras = max_cpu_loras
        self.dtype, self.device, self.allow_bin = dtype, device, allow_bin
        self.holders = attach_lora(model, max_loras, max_lora_rank, dtype, device)
        self.host: OrderedDict[int, LoRAAdapter] = OrderedDict()  # LRU: oldest first
        self.slot_of: OrderedDict[int, int] = OrderedDict()  # resident adapter id -> slot, LRU: oldest first
        self.free_slots = list(range(max_loras))
        self.num_loads = 0  # read from disk
        self.num_swaps = 0  # copied into a slot (host -> device)
        self.num_evictions = 0  # pushed out of a slot to make room
        self.last_load_ms = 0.0

    def _host_adapter(self, lora: LoRARequest) -> LoRAAdapter:
        adapter = self.host.get(lora.lora_int_id)
        if adapter is not None:
            self.host.move_to_end(lora.lora_int_id)
            return adapter
        start = time.perf_counter()
        adapter = load_adapter(lora.lora_path, lora.lora_name, lora.lora_int_id, self.model_config,
                               self.max_lora_rank, self.allow_bin, self.dtype)
        self.last_load_ms = (time.perf_counter() - start) * 1e3
        self.num_loads += 1
        unknown = set(adapter.modules) - set(self.holders)
        if unknown:
            raise ValueError(f"LoRA adapter {lora.lora_name!r} targets modules this model does not have: "
                             f"{sorted(unknown)[:4]}")
        self.host[lora.lora_int_id] = adapter
        while len(self.host) > self.max_cpu_loras:
            self.host.popitem(last=False)
        return adapter

    def _slot_for(self, lora: LoRARequest, needed: set[int]) -> int:
        slot = self.slot_of.get(lora.lora_int_id)
        if slot is not None:
            self.slot_of.move_to_end(lora.lora_int_id)
            return slot
        adapter = self._host_adapter(lora)
        if self.free_slots:
            slot = self.free_slots.pop(0)
        else:
            victim = next((i for i in self.slot_of if i not in needed), None)
            if victim is None:
                raise RuntimeError(f"more than max_loras ({self.max_loras}) adapters in one step")
            slot = self.slot_of.pop(victim)
            self.num_evictions += 1
        for path, holder in self.holders.items():
            holder.set_slot(slot, adapter.modules.get(path))
        self.slot_of[lora.lora_int_id] = slot
        self.num_swaps += 1
        return slot

    def prepare_step(self, loras: Sequence[Optional[LoRARequest]], query_lens: Sequence[int]) -> Optional[LoRAMapping]:
        """The step's mapping: each request's adapter made resident, its tokens pointed at its slot."""
        if not any(loras):
            return None
        needed = {lora.lora_int_id for lora in loras if lora is not None}
        slots = [-1 if lora is None else self._slot_for(lora, needed) for lora in loras]
        return build_mapping(slots, list(query_lens), self.dtype, self.device)

    def select_logit_rows(self, mapping: Optional[LoRAMapping], index: Optional[torch.Tensor]) -> None:
        """Names the step's token rows (`hidden[index]`, None: all) the LM head is about to project."""
        head = self.holders.get(LM_HEAD_MODULE)
        if head is not None:
            head.select_rows(mapping, index)

    def remove(self, lora_int_id: int) -> None:
        """Forgets an adapter (unloaded by the front end): its slot is freed, its host copy dropped."""
        self.host.pop(lora_int_id, None)
        slot = self.slot_of.pop(lora_int_id, None)
        if slot is not None:
            for holder in self.holders.values():
                holder.set_slot(slot, None)
            self.free_slots.append(slot)

    def stats(self) -> dict:
        return {"resident": list(self.slot_of), "host": list(self.host), "loads": self.num_loads,
                "swaps": self.num_swaps, "evictions": self.num_evictions, "last_load_ms": self.last_load_ms}
