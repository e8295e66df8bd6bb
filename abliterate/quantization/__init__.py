"""On-the-fly quantization of the model stage 2 edits (``--quantization``): torchao, bitsandbytes, NVFP4.

``options`` names the choices and their torchao configs, ``device_check``
refuses what cannot run before loading, ``apply`` builds the loader's
``quantization_config`` (or packs NVFP4 after loading), ``lora_support`` lets
the LoRA edits attach to every quantized Linear.
"""

from abliterate.quantization.options import (
    OPTIONS,
    QuantizationRequest,
    check_overrides,
)

__all__ = ["OPTIONS", "QuantizationRequest", "check_overrides"]
