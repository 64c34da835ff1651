"""Multi-LoRA serving: PEFT adapters loaded at run time, many in one batch.

    request.py        LoRARequest (what a caller names), pure data
    adapter.py        PEFT directory -> validated LoRAAdapter (shapes from the base model's config)
    registry.py       the front end's adapters by name and id (validation before a request is queued)
    admission.py      the scheduler's cap on distinct adapters per step (pure Python)
    ops.py            batched shrink/expand in torch (per-token slot index)
    layers.py         the weight-method wrapper and per-layer slot weights
    worker_manager.py slots on the device, the host cache, LRU swapping, the step's mapping
"""

from pagellm.lora.request import LoRARequest  # noqa: F401
