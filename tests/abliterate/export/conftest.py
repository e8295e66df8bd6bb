"""Tiny sharded checkpoints and a chosen edit, built once per session (CPU, seconds)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3MoeConfig

from abliterate.architectures import discover
from abliterate.artifacts import ChosenTrial, read_chosen_trial, write_chosen_trial
from abliterate.edits.kernel import KernelParameters
from abliterate.edits.plan import (
    PER_LAYER,
    AbliterationParameters,
    edit_directions,
    plan_edits,
)
from checkpoint_formats.reader import CheckpointReader
from tests import tiny_models

HIDDEN = 64


def load_all(directory) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint as stored."""
    with CheckpointReader(directory) as reader:
        return {name: tensor for name, tensor in reader.iter_tensors()}


def shard_layout(directory) -> dict[str, str]:
    with CheckpointReader(directory) as reader:
        return {name: reader.shard_of(name).name for name in reader.names()}
LAYERS = 4


def llama_config() -> LlamaConfig:
    return tiny_models.llama_config(num_hidden_layers=LAYERS)


def moe_config() -> Qwen3MoeConfig:
    return tiny_models.qwen3_moe_config()


def save_sharded(config, directory, shard_size: str = "40KB") -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(directory, max_shard_size=shard_size)


def make_trial(config, directory, method: str = "rank1", seed: int = 1, subspace_rank: int | None = None) -> ChosenTrial:
    """A chosen-trial artifact written by stage 2's own writer: per-layer directions, both kernels.

    ``subspace_rank`` k: per-layer orthonormal [k, hidden] bases instead (``--directions subspace``)."""
    with torch.device("meta"):
        components = discover(AutoModelForCausalLM.from_config(config)).components
    layers = config.num_hidden_layers
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(layers + 1, HIDDEN, generator=generator)
    directions = directions / directions.norm(dim=-1, keepdim=True)
    if subspace_rank is not None:
        directions = torch.linalg.qr(torch.randn(layers + 1, HIDDEN, subspace_rank, generator=generator)).Q.transpose(1, 2)
    parameters = AbliterationParameters(PER_LAYER, None, {
        "attn": KernelParameters(max_weight=1.2, max_weight_position=layers - 1, min_weight=0.4, min_weight_distance=2),
        "mlp": KernelParameters(max_weight=1.0, max_weight_position=1.5, min_weight=0.5, min_weight_distance=3),
    })
    header = {"model": "tiny", "source_format": "bf16", "trial_number": 7, "method": method,
              # stage 2 records rank 1 for rank1, and at least k for a rank-k subspace
              "rank": max(1 if method == "rank1" else 2, subspace_rank or 1),
              "svd_seed": 0, "parameters": parameters.to_dict(), "num_layers": layers, "hidden_size": HIDDEN,
              "metrics": {"refusals": 1, "n_harmful": 10, "compliance": 8, "kl": 0.01},
              "base_metrics": {"refusals": 9, "n_harmful": 10, "compliance": 0, "kl": 0.0}}
    directory.mkdir(parents=True, exist_ok=True)
    write_chosen_trial(directory, header=header, edits=plan_edits(parameters, components), directions=directions,
                       edit_vectors=edit_directions(parameters, directions))
    return read_chosen_trial(directory)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    save_sharded(llama_config(), directory)
    return directory


@pytest.fixture(scope="session")
def moe_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("moe")
    save_sharded(moe_config(), directory)
    return directory


def _modelopt_pair(config, root):
    """(bf16 base dir, its ModelOpt NVFP4 export dir), both sharded: a real stage-1 checkpoint in seconds."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint

    base_dir, stage1_dir = root / "base", root / "nvfp4"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(base_dir, max_shard_size="40KB")
    model.config.dtype = torch.bfloat16  # save_pretrained left the string "bfloat16", which the exporter rejects
    calibration = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(3))
    mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, lambda m: m(calibration))
    export_hf_checkpoint(model, export_dir=str(stage1_dir), max_shard_size="20KB")
    return base_dir, stage1_dir


@pytest.fixture(scope="session")
def nvfp4_pair(tmp_path_factory):
    return _modelopt_pair(llama_config(), tmp_path_factory.mktemp("llama_nvfp4"))


@pytest.fixture(scope="session")
def moe_nvfp4_pair(tmp_path_factory):
    """ModelOpt exports transformers' fused 3-D experts one tensor per expert, each with its own scales."""
    return _modelopt_pair(moe_config(), tmp_path_factory.mktemp("moe_nvfp4"))
