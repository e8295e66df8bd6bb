"""What is particular to one model family, behind one registry.

The generic discovery (``discovery.py``) handles every family whose layers
sit at a usual path and whose output projections have usual names. A family
gets an entry here only for what differs: where its decoder layers live, or
extra projection names. Keyed by ``config.model_type``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Where decoder layers usually live, tried in order. NemotronH checkpoints made
# with remote code put them under ``backbone``; multimodal models nest the
# language model one level down.
GENERIC_LAYER_PATHS: tuple[str, ...] = (
    "model.layers",
    "backbone.layers",
    "model.language_model.layers",
    "language_model.model.layers",
    "model.language_model.model.layers",
    "model.text_model.layers",
    "model.decoder.layers",
    "transformer.h",
    "transformer.blocks",
    "gpt_neox.layers",
)

# Module-name suffixes of projections that write into the residual stream,
# split by the weight kernel they get: the token mixer (attention, linear
# attention, Mamba) and the channel mixer (MLP, experts, shared experts).
TOKEN_MIXER_SUFFIXES: tuple[str, ...] = ("o_proj", "out_proj", "dense", "c_proj", "wo")
CHANNEL_MIXER_SUFFIXES: tuple[str, ...] = ("down_proj", "w2", "fc2", "dense_4h_to_h", "c_proj", "wo")
# Names of the parent module that tell which mixer a projection belongs to.
TOKEN_MIXER_PARENTS: tuple[str, ...] = ("attn", "attention", "self_attn", "mixer", "linear_attn", "mamba", "temporal")
CHANNEL_MIXER_PARENTS: tuple[str, ...] = ("mlp", "moe", "experts", "shared_expert", "shared_experts", "ffn", "feed_forward", "block_sparse_moe")
# Names of 3-D expert parameters that write into the residual stream.
FUSED_EXPERT_PARAMETERS: tuple[str, ...] = ("down_proj", "w2", "down_proj_weight", "output_linear")


@dataclass(frozen=True)
class FamilyRule:
    layer_paths: tuple[str, ...] = ()
    # Overrides the experts module's own ``is_transposed`` flag when a family
    # stores [experts, in, out] without saying so.
    experts_transposed: bool | None = None
    # Projections that fused kernels read as ``.weight`` directly (Mamba's
    # out_proj in mamba_split_conv1d_scan_combined), bypassing a LoRA forward;
    # PEFT refuses them. They are edited through a weight parametrization.
    weight_level_suffixes: tuple[str, ...] = field(default_factory=tuple)


_MAMBA = FamilyRule(weight_level_suffixes=("out_proj",))
FAMILIES: dict[str, FamilyRule] = {
    "nemotron_h": FamilyRule(layer_paths=("model.layers", "backbone.layers"), weight_level_suffixes=("out_proj",)),
    "mamba": _MAMBA,
    "mamba2": _MAMBA,
    "falcon_mamba": _MAMBA,
    "falcon_h1": _MAMBA,
    "bamba": _MAMBA,
    "granitemoehybrid": _MAMBA,
    "gpt_oss": FamilyRule(experts_transposed=True),
    "dbrx": FamilyRule(layer_paths=("transformer.blocks",)),
}


def family_rule(model_type: str | None) -> FamilyRule:
    return FAMILIES.get(model_type or "", FamilyRule())
