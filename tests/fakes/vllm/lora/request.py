"""`vllm.lora.request.LoRARequest` of the test stand-in (see tests/fakes/vllm/__init__.py)."""

from dataclasses import dataclass


@dataclass
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str
