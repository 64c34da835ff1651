"""LoRA adapters over HTTP: which adapter a request's `model` names, the adapters in /v1/models,
and loading / unloading at run time.

    POST /v1/load_lora_adapter   {"lora_name", "lora_path"}  200; 400 bad adapter (rank, shapes, files); 409 name taken
    POST /v1/unload_lora_adapter {"lora_name"}               200; 404 unknown; 409 while requests use it

Unloading is refused (409 `adapter_in_use`) while the core still has running or waiting requests
under the adapter, judged from a fresh core stats snapshot: the client retries once they finished,
rather than the server holding the request open. An unloaded adapter's name answers 404 at once;
its worker copy leaves the slots and the host cache by LRU (ids are never reused, so a copy can
never serve another adapter).
"""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from pagellm.entrypoints.openai.errors import OpenAIError
from pagellm.entrypoints.openai.protocol import RequestModel


class LoadLoRAAdapterRequest(RequestModel):
    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadLoRAAdapterRequest(RequestModel):
    lora_name: str = Field(min_length=1, max_length=256)


class LoRAServing:
    """The server's named adapters; the registry itself is the front end's (`engine.intake.loras`)."""

    def __init__(self, engine, served_model_name: str) -> None:
        self.engine = engine
        self.model_name = served_model_name
        self.registry = engine.intake.loras

    def resolve(self, model: Optional[str]):
        """The LoRARequest a request's `model` names (None: the base model); 404 for an unknown name."""
        if model is None or model == self.model_name:
            return None
        lora = self.registry.get(model)
        if lora is None:
            served = ", ".join([self.model_name, *self.registry.names()])
            raise OpenAIError(f"the model `{model}` does not exist; this server serves {served}", 404,
                              param="model", code="model_not_found")
        return lora

    def cards(self) -> list[dict]:
        """(id, root path, parent) of every loaded adapter, for /v1/models."""
        return [dict(id=name, root=self.registry.get(name).lora_path, parent=self.model_name)
                for name in self.registry.names()]

    async def load(self, body: LoadLoRAAdapterRequest) -> str:
        if not self.registry.enabled:
            raise OpenAIError("this server was started without --enable-lora", 400, code="lora_disabled")
        if body.lora_name == self.model_name or self.registry.get(body.lora_name) is not None:
            raise OpenAIError(f"the adapter `{body.lora_name}` is already loaded", 409, param="lora_name",
                              code="adapter_exists")
        try:  # reads and checks the adapter's tensors: off the event loop
            await self.engine.run_off_loop(self.registry.add, body.lora_name, body.lora_path)
        except ValueError as exc:
            raise OpenAIError(str(exc), 400, param="lora_path", code="invalid_adapter") from None
        return f"LoRA adapter {body.lora_name!r} loaded"

    async def unload(self, body: UnloadLoRAAdapterRequest) -> str:
        self.resolve(body.lora_name)  # 404 unless loaded
        if body.lora_name == self.model_name:
            raise OpenAIError("the base model cannot be unloaded", 400, param="lora_name", code="invalid_value")
        stats = await self.engine.wait_for_stats()
        busy = stats.lora_running.get(body.lora_name, 0) + stats.lora_waiting.get(body.lora_name, 0)
        if busy:
            raise OpenAIError(f"the adapter `{body.lora_name}` still has {busy} running or waiting requests; "
                              "retry once they finished", 409, param="lora_name", code="adapter_in_use")
        self.registry.remove(body.lora_name)
        return f"LoRA adapter {body.lora_name!r} unloaded"
