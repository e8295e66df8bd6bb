"""Where each piece of a checkpoint's tensor layout is named: one table per fact, no logic.

Loading, inspecting, merging, re-quantizing and choosing what not to quantize
all need to know how checkpoints spell the same things: which per-expert
projections make up transformers' fused 3-D expert parameters, which sibling
projections share one NVFP4 global scale, which tensors are quantization
state rather than weights, and what MoE routers are called. A new MoE layout
is an edit here, not in every stage that reads checkpoints.
"""

from __future__ import annotations

# --- MoE experts -----------------------------------------------------------------------------------------
# transformers' fused expert parameter -> the per-expert projections concatenated along its output dim,
# each with the alternative names it may have in a checkpoint (``w1|w3|w2`` in older Mixtral-style layouts).
FUSED_EXPERT_PARTS: dict[str, tuple[tuple[str, ...], ...]] = {
    "gate_up_proj": (("gate_proj", "w1"), ("up_proj", "w3")),
    "down_proj": (("down_proj", "w2"),),
    "up_proj": (("up_proj",),),
}

# --- checkpoint names vs transformers module names, per family ------------------------------------------
# config.json ``model_type`` -> (module-name fragment, checkpoint-name fragment) pairs. These families' checkpoints
# (the originals, transformers 5's own save_pretrained and ModelOpt 0.47's export alike) keep names that
# transformers renames at load time (its conversion_mapping): Mixtral's ``layers.N.block_sparse_moe.experts.E.w1``
# is the model's ``layers.N.mlp.experts`` (parts per FUSED_EXPERT_PARTS). The first pair that matches wins, in
# either direction, so a more specific pair comes first. A family missing here uses its module names on disk.
CHECKPOINT_RENAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "mixtral": ((".mlp.", ".block_sparse_moe."),),
    "phimoe": ((".mlp.router.", ".block_sparse_moe.gate."), (".mlp.", ".block_sparse_moe.")),
}

# Families whose ModelOpt NVFP4 export stage 2 cannot read, with why: refused before any work in stage 1 and 2.
UNSUPPORTED_FAMILIES: dict[str, str] = {
    "gpt_oss": "ModelOpt 0.47 exports its experts as fused, transposed 3-D NVFP4 tensors (experts.gate_up_proj "
               "[E, in/2, out] with one weight_scale_2 for all experts), which our loader and re-export do not read",
}

# MoE routers (glob of the module name, label for messages): tiny, and quantization noise changes expert choice.
MOE_ROUTERS: tuple[tuple[str, str], ...] = (
    ("*router", "MoE router"),
    ("*mlp.gate", "MoE router"),
    ("*block_sparse_moe.gate", "MoE router"),
    ("*mixer.gate", "MoE router (NemotronH)"),
    ("*moe.gate", "MoE router"),
)
SHARED_EXPERT_GATES: tuple[str, ...] = ("*shared_expert_gate",)  # a 1-wide projection beside the experts

# --- projections that share scales ----------------------------------------------------------------------
# Sibling projections that read the same input and so share weight_scale_2 / input_scale in ModelOpt's export.
SCALE_SHARING_GROUPS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))


def scale_sharing_group(leaf: str) -> tuple[str, ...] | None:
    """The group of projection names ``leaf`` (e.g. ``k_proj``) shares its scales with, or None."""
    return next((group for group in SCALE_SHARING_GROUPS if leaf in group), None)


# --- tensor suffixes ---------------------------------------------------------------------------------------
# What one quantized module ``P`` stores, per scheme and dialect (``P.<suffix>``).
MODELOPT_NVFP4_SUFFIXES = ("weight", "weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale")
COMPRESSED_NVFP4_SUFFIXES = ("weight_packed", "weight_scale", "weight_global_scale", "input_global_scale")
FP8_SUFFIXES = ("weight", "weight_scale", "input_scale", "pre_quant_scale")
# The three tensors an NVFP4 weight is re-quantized into (longest first, so a suffix test finds the right one).
NVFP4_WEIGHT_PARTS = ("weight_scale_2", "weight_scale", "weight")
# Suffixes that are quantization state, not a weight of their own (scales, packed codes, KV-cache scales).
QUANTIZATION_STATE_SUFFIXES = ("weight_packed", "weight_scale_2", "weight_global_scale", "input_global_scale",
                               "weight_scale", "input_scale", "k_scale", "v_scale")
# The tensor that stands for a module's weight in a quantized checkpoint (plain/ModelOpt, compressed-tensors).
PRIMARY_WEIGHT_SUFFIXES = (".weight", ".weight_packed")
# KV-cache scales: state of the serving runtime's cache, with no parameter in the transformers model.
KV_CACHE_SUFFIXES = (".k_scale", ".v_scale", ".k_proj.output_scale", ".v_proj.output_scale")
# Tensors a quantized checkpoint may hold that have no parameter in a dequantized model (activation and cache scales).
NO_PARAMETER_SUFFIXES = (".k_scale", ".v_scale", ".input_scale", ".input_global_scale")

# --- checkpoint vs. transformers naming ------------------------------------------------------------------
# Top-level prefixes a family's checkpoints use on disk where transformers' model names the module otherwise
# (on disk, in the model): NemotronH checkpoints (NVIDIA's and ModelOpt's exports) say ``backbone.``,
# transformers 5's NemotronHForCausalLM says ``model.`` (its conversion_mapping renames at load).
CHECKPOINT_PREFIX_ALIASES: tuple[tuple[str, str], ...] = (("backbone.", "model."),)
