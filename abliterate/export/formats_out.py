"""Each export format: weights plus the config files that make the directory loadable and servable.

All writers take an already-created (temporary) directory from
``atomic_output_dir``; the caller renames it into place only when everything,
verification included, succeeded.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import save_file

from abliterate.edits.delta import abliteration_factors
from abliterate.export.requantize import plan_requantization, requantized_shards
from abliterate.export.source import FullPrecisionSource
from abliterate.export.streaming_merge import (
    StreamingMerger,
    shard_progress,
    write_shards,
)
from checkpoint_formats.detect import FormatKind
from checkpoint_formats.exclusions import repair_exclusions
from checkpoint_formats.servability import require_servable
from foundation.errors import UserError
from foundation.tokenizer_files import copy_tokenizer_files

FORMATS = ("nvfp4", "bf16", "adapter")
# ModelOpt NVFP4 dialects whose weights we re-quantize with the same codec and scales layout.
NVFP4_REEXPORTABLE = (FormatKind.MODELOPT_NVFP4, FormatKind.MODELOPT_W4A16_NVFP4)


def carry_model_files(source_dirs: list[Path], out_dir: Path) -> list[str]:
    """Tokenizer, chat template and generation config, copied verbatim from the first source that has them."""
    copied: list[str] = []
    for directory in source_dirs:
        copied += copy_tokenizer_files(str(directory), None, out_dir)
    return copied


def _write_full_precision_config(source: FullPrecisionSource, out_dir: Path) -> None:
    """The source's config without quantization; a dequantized source's weights now have its dequant dtype."""
    config = json.loads((source.directory / "config.json").read_text())
    config.pop("quantization_config", None)
    if source.is_dequantized:
        config["dtype"] = str(source.dtype).removeprefix("torch.")
        config.pop("torch_dtype", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def export_full_precision(merger: StreamingMerger, out_dir: Path, *, show_progress: bool = True) -> dict:
    """Plain HF checkpoint (``bf16``): the merged weights, shards mirroring the source, no quantization config."""
    with shard_progress() if show_progress else nullcontext() as progress:
        write_shards(merger.shards(progress), out_dir)
    _write_full_precision_config(merger.source, out_dir)
    return {"format": "bf16", "edited_tensors": len(merger.edited_names)}


def export_nvfp4(merger: StreamingMerger, stage1_dir: Path, out_dir: Path, *, show_progress: bool = True) -> dict:
    """ModelOpt NVFP4 checkpoint: the stage-1 checkpoint with the edited weights re-quantized."""
    stage1 = FullPrecisionSource(stage1_dir)
    if stage1.format.kind not in NVFP4_REEXPORTABLE:
        raise UserError(str(stage1_dir),
                        f"nvfp4 re-export needs a ModelOpt NVFP4 stage-1 checkpoint, got {stage1.format.describe()}",
                        "pass the stage-1 output with --checkpoint, or export --format bf16")
    plan = plan_requantization(merger, stage1)
    with shard_progress() if show_progress else nullcontext() as progress:
        write_shards(requantized_shards(merger, stage1, plan, progress), out_dir)
    for name in ("config.json", "hf_quant_config.json"):
        # Same format, same modules quantized, same scales carried: the stage-1 quantization config holds as is.
        (out_dir / name).write_bytes((stage1_dir / name).read_bytes())
    repaired = repair_exclusions(out_dir)  # a checkpoint ModelOpt wrote elsewhere may carry its exclusion bugs
    require_servable(out_dir, where=f"nvfp4 re-export of {stage1_dir}")  # as stage 1 checks its own export
    return {
        "format": "nvfp4",
        "edited_tensors": len(set(merger.edited_names)),
        "requantized_weights": sorted(plan.requantized),
        "edited_unquantized": sorted(plan.edited_full_precision),
        "quant_algo": stage1.format.quant_algo,
        "repaired_exclusions": repaired,
    }


def export_adapter(merger: StreamingMerger, out_dir: Path, base_model_name: str) -> dict:
    """The edit alone as a PEFT LoRA adapter (safetensors + adapter_config.json) for ``base_model_name``.

    The factors are computed against the merge source's weights, so the adapter
    reproduces the merge exactly only on that base (named in the config).
    """
    from peft import LoraConfig

    trial = merger.trial
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name, tensor_edit in merger.plan.edits.items():
        if tensor_edit.record.num_experts is not None:
            raise UserError(name, "a LoRA adapter cannot express a per-expert edit of fused expert weights",
                            "export --format bf16 or nvfp4 for this model")
        weight = merger.source.get(name)
        record = tensor_edit.record
        left, right = abliteration_factors(weight, trial.directions[record.direction], record.strength,
                                           method=trial.method, rank=trial.rank, seed=trial.svd_seed)
        module = name.removesuffix(".weight")
        tensors[f"base_model.model.{module}.lora_A.weight"] = right.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = left.contiguous()
        ranks[module] = right.shape[0]
    if not ranks:
        raise UserError("chosen trial", "the edit touches no weight: every strength is zero", "choose another trial")
    rank = max(ranks.values())
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,  # scaling alpha/r = 1: the factors already carry the strength
        target_modules=sorted(ranks),
        rank_pattern={module: r for module, r in ranks.items() if r != rank},
        alpha_pattern={module: r for module, r in ranks.items() if r != rank},
        lora_dropout=0.0,
        bias="none",
        base_model_name_or_path=base_model_name,
        task_type="CAUSAL_LM",
    )
    config.save_pretrained(str(out_dir))
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    return {"format": "adapter", "modules": len(ranks), "rank": rank, "base_model": base_model_name}
