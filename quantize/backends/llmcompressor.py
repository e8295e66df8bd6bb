"""Second backend: compressed-tensors NVFP4 through llm-compressor's ``oneshot``.

Its sequential pipeline calibrates one decoder layer at a time, onloading
each to the GPU and keeping only that layer's activations, so GPU memory is
about one layer whatever the model size: the leanest path for very large
models. The output is a compressed-tensors checkpoint (``weight_packed``,
reciprocal global scales, ``"format": "nvfp4-pack-quantized"``), which vLLM
serves as well; ``quant-abliterate convert`` turns it into ModelOpt's layout.
The model is loaded on the CPU (and disk, with ``--offload_folder``) on
purpose: the sequential pipeline onloads one layer at a time by itself.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

from rich.console import Console

from quantize.export import ensure_architectures
from quantize.settings import QuantizeSettings
from quantize.skip_layers import SkipMatch

LLMCOMPRESSOR_SCHEMES = {"nvfp4": "NVFP4", "w4a16_nvfp4": "NVFP4A16"}


def ignore_entry(module_glob: str) -> str:
    """llm-compressor ignores modules by name or by ``re:`` regex; a glob becomes the latter."""
    return "re:" + fnmatch.translate(module_glob)


class LLMCompressorBackend:
    name = "llmcompressor"
    loads_on_gpu = False

    def calibrate(self, model, tokenizer, calibration_set, skipped: list[SkipMatch], settings: QuantizeSettings,
                  console: Console):
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import QuantizationModifier

        scheme = LLMCOMPRESSOR_SCHEMES[settings.format]
        recipe = QuantizationModifier(targets="Linear", scheme=scheme, ignore=[ignore_entry(m.module_glob) for m in skipped])
        console.print(f"llm-compressor oneshot ({scheme}, sequential pipeline) on {len(calibration_set.samples)} samples")
        return oneshot(
            model=model, tokenizer=tokenizer, recipe=recipe, dataset=calibration_set.as_hf_dataset(),
            num_calibration_samples=len(calibration_set.samples),
            max_seq_length=max(len(sample) for sample in calibration_set.samples),
            batch_size=settings.batch_size, shuffle_calibration_samples=False, pipeline="sequential",
            moe_calibrate_all_experts=settings.calib_all_experts,
        )

    def export(self, model, staging: Path, settings: QuantizeSettings) -> dict[str, Any]:
        ensure_architectures(model)
        model.save_pretrained(str(staging), save_compressed=True)
        return {"backend": self.name, "format": settings.format, "llmcompressor_scheme": LLMCOMPRESSOR_SCHEMES[settings.format],
                "checkpoint_format": "compressed-tensors"}
