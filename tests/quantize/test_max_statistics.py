"""The fast max-calibration pass (quantize/max_statistics.py): the same checkpoint, without the syncs.

Each test calibrates a tiny random Llama on CPU twice, ModelOpt's way and
ours, and compares what matters: every exported tensor bit for bit, the host
syncs and weight reductions per batch, and the NaN error a user gets.
"""

from __future__ import annotations

import collections
import copy

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from foundation.errors import UserError
from quantize import max_statistics
from quantize.calibrate import calibrate, make_forward_loop
from quantize.calibration.calibration_set import CalibrationSet
from quantize.calibration.schema import CalibrationSettings
from quantize.export import export_modelopt_checkpoint
from quantize.recipes import build_quant_config, get_recipe
from tests.tiny_models import VOCAB, fused_moe, llama_config

mtq = pytest.importorskip("modelopt.torch.quantization")


class OpCounter(TorchDispatchMode):
    """Counts aten ops; ``_local_scalar_dense`` is a device-to-host read (a host sync on a GPU)."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.weight_reads = 0
        self.weights: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        if func.overloadpacket.__name__ in ("max", "min", "linalg_vector_norm") and args:
            self.weight_reads += isinstance(args[0], torch.Tensor) and args[0].data_ptr() in self.weights
        return func(*args, **(kwargs or {}))


def calibration_set(count: int = 10, seed: int = 3) -> CalibrationSet:
    generator = torch.Generator().manual_seed(seed)
    samples = [torch.randint(3, VOCAB, (int(length),), generator=generator).tolist()
               for length in torch.randint(5, 24, (count,), generator=generator)]
    return CalibrationSet(samples=samples, per_dataset={}, token_ids_sha256="", mix_sha256="",
                          settings=CalibrationSettings(min_token_length=4))


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(llama_config()).to(torch.bfloat16).eval()


def quantize(model, format_name: str, fast: bool, samples: CalibrationSet, kv_cache: str = "none", **loop_options):
    loop = make_forward_loop(samples, batch_size=4, pad_token_id=0, fast_max=fast, **loop_options)
    model, _ = calibrate(model, build_quant_config(get_recipe(format_name), kv_cache=kv_cache), loop)
    return model


@pytest.mark.parametrize("format_name, lean, architecture, kv_cache", [
    ("nvfp4", True, "llama", "none"), ("nvfp4", False, "llama", "none"), ("fp8", True, "llama", "none"),
    ("w4a8", True, "llama", "none"),
    ("nvfp4", True, "llama", "fp8"),  # KV-cache quantizers enabled: ModelOpt's attention forward, sync-free collection
    ("nvfp4", True, "qwen3_moe", "none"),  # fused 3-D expert weights: ModelOpt's own forward, paused per-expert weights
])
def test_exported_checkpoint_is_bit_identical(tmp_path, format_name, lean, architecture, kv_cache):
    source, samples = (tiny_llama() if architecture == "llama" else fused_moe().to(torch.bfloat16)), calibration_set()
    exported = {}
    for fast in (False, True):
        model = quantize(copy.deepcopy(source), format_name, fast, samples, kv_cache=kv_cache, lean_linears=lean)
        export_modelopt_checkpoint(model, tmp_path / str(fast))
        exported[fast] = load_file(tmp_path / str(fast) / "model.safetensors")
    assert exported[True].keys() == exported[False].keys()
    assert any(name.endswith("input_scale") for name in exported[True])  # activation statistics were exported
    assert kv_cache == "none" or any(name.endswith("k_scale") for name in exported[True]), sorted(exported[True])[:8]
    for name, tensor in exported[False].items():
        assert exported[True][name].dtype == tensor.dtype, name
        assert torch.equal(exported[True][name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name


def test_a_fast_pass_syncs_once_and_reads_no_weight():
    from modelopt.torch.quantization.model_calib import (
        enable_stats_collection,
        weight_only_quantize,
    )

    samples = calibration_set(count=12)
    plain = OpCounter()
    with plain, torch.no_grad():  # transformers itself reads the padding mask back (a sync or two per batch)
        for input_ids, attention_mask in samples.batches(4, 0):
            tiny_llama()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    counts = {}
    for fast in (False, True):
        model = quantize(tiny_llama(), "nvfp4", fast=False, samples=samples)
        enable_stats_collection(model)  # the state ModelOpt's max_calibrate runs our loop in
        weight_only_quantize(model)
        counter = OpCounter()
        counter.weights = {p.data_ptr() for name, p in model.named_parameters() if name.endswith("proj.weight")}
        with counter:
            make_forward_loop(samples, batch_size=4, pad_token_id=0, fast_max=fast)(model)  # 3 batches
        counts[fast] = counter
    linears_per_batch = 2 * 7
    assert counts[False].ops["_local_scalar_dense"] >= 3 * 2 * linears_per_batch * 3  # 3 asserts x 2 quantizers
    assert counts[False].weight_reads >= 3 * linears_per_batch
    # The model's own syncs plus the one finite check at the end of the pass.
    assert counts[True].ops["_local_scalar_dense"] == plain.ops["_local_scalar_dense"] + 1
    assert counts[True].weight_reads == 0
    assert sum(counts[True].ops.values()) < sum(counts[False].ops.values()) / 2


def test_state_is_restored_after_a_pass():
    from modelopt.torch.quantization.model_calib import (
        enable_stats_collection,
        weight_only_quantize,
    )

    model = quantize(tiny_llama(), "nvfp4", fast=False, samples=calibration_set())
    enable_stats_collection(model)
    weight_only_quantize(model)
    with max_statistics.fast_max_collection(model) as state:
        assert state.paused_weight_quantizers and state.sync_free
        assert all(not quantizer._if_calib for quantizer in state.paused_weight_quantizers)
        assert all(name.endswith("input_quantizer") for name in state.sync_free)
        # Every decoder Linear (lm_head's quantizers are disabled) and both attention wrappers (no --kv_cache).
        assert len(state.lean_linears) == 2 * 7 + 2
    assert all(quantizer._if_calib for quantizer in state.paused_weight_quantizers)
    assert all("collect" not in calibrator.__dict__ for calibrator in state.sync_free.values())
    assert all("forward" not in module.__dict__ for module in state.lean_linears)


def test_a_hooked_or_patched_linear_keeps_modelopt_forward():
    from modelopt.torch.quantization.model_calib import (
        enable_stats_collection,
        weight_only_quantize,
    )

    model = quantize(tiny_llama(), "nvfp4", fast=False, samples=calibration_set())
    enable_stats_collection(model)
    weight_only_quantize(model)
    hooked, patched = model.model.layers[0].mlp.up_proj, model.model.layers[1].self_attn.o_proj
    seen = []
    hooked.input_quantizer.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape))
    patched.forward = patched.forward  # as accelerate's hooks do: an instance attribute
    with max_statistics.fast_max_collection(model) as state:
        assert hooked not in state.lean_linears and patched not in state.lean_linears
        assert len(state.lean_linears) == 2 * 7 + 2 - 2
        model(input_ids=torch.tensor([[3, 4, 5]]), use_cache=False)
    assert seen == [torch.Size([1, 3, 64])]
    assert "forward" in patched.__dict__  # not ours to remove


@pytest.mark.parametrize("bad, word", [(float("nan"), "NaN"), (float("inf"), "NaN or inf")])
def test_non_finite_activations_still_stop_the_run(bad, word):
    model = tiny_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight[5] = bad  # token 5 appears in the samples
    samples = calibration_set()
    assert any(5 in sample for sample in samples.samples)
    with pytest.raises(UserError, match=word) as caught:
        quantize(model, "nvfp4", fast=True, samples=samples, check_every=1)
    assert "calibrat" in str(caught.value)
    assert all("collect" not in module._calibrator.__dict__ for module in model.modules()
               if hasattr(module, "_calibrator") and module._calibrator is not None)


def test_abs_max_matches_modelopt_reduction_bit_for_bit():
    from modelopt.torch.quantization.utils import reduce_amax

    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for x in (torch.randn(7, 33, generator=generator).to(dtype), -torch.rand(5, 8, generator=generator).to(dtype),
                  torch.rand(64, generator=generator).to(dtype), torch.zeros(3, 4, dtype=dtype)):
            expected = reduce_amax(x, axis=None)
            assert max_statistics.abs_max(x).dtype == expected.dtype
            assert torch.equal(max_statistics.abs_max(x), expected)
        with_nan = torch.randn(4, 4, generator=generator).to(dtype)
        with_nan[1, 2] = float("nan")
        assert max_statistics.abs_max(with_nan).isnan()
