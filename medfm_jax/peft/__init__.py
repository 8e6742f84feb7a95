"""Parameter-efficient fine-tuning: LoRA as param-tree transforms, trainable masks, layer-wise lr decay."""
from medfm_jax.peft import freeze, lora
from medfm_jax.peft.lora import LoraSpec

__all__ = ["freeze", "lora", "LoraSpec"]
