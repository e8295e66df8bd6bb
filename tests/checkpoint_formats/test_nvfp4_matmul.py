"""The Triton NVFP4 matmul against dequantize-then-fp32-matmul, on CPU.

Argument checks and ``available`` run everywhere. The kernels themselves run
under Triton's interpreter (TRITON_INTERPRET=1, CPU tensors) where Triton is
installed; the project does not pin it, so CI without it skips those tests.
The interpreter's bf16 is not the GPU's (no bf16 ``tl.dot``, truncating
casts), so the kernels are checked with fp16/fp32 here; the bench checks the
bf16 paths on the GPU.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when nvfp4_matmul defines its kernels, so first

import pytest
import torch

from checkpoint_formats import nvfp4, nvfp4_launch_shapes, nvfp4_matmul
from checkpoint_formats.nvfp4_matmul import KernelConfig


def _weight(n: int, k: int, seed: int = 0) -> nvfp4.NVFP4Weight:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen) * torch.logspace(-3, 1, n).unsqueeze(1)
    weight[:, :16] = 0.0  # an all-zero block (scale 1, codes 0)
    return nvfp4.quantize_weight(weight)


def _args(n: int = 32, k: int = 64):
    q = _weight(n, k)
    return torch.randn(2, k), q.packed, q.weight_scale, q.weight_scale_2


def test_not_available_on_cpu() -> None:
    assert not nvfp4_matmul.available("cpu")
    assert not nvfp4_matmul.available(torch.device("cpu"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: (a[0], a[1].to(torch.int8), a[2], a[3], None), "packed"),
        (lambda a: (a[0], a[1], a[2].float(), a[3], None), "weight_scale must"),
        (lambda a: (a[0], a[1], a[2][:, :-1], a[3], None), "weight_scale must"),
        (lambda a: (a[0], a[1], a[2], a[3].double(), None), "weight_scale_2"),
        (lambda a: (a[0], a[1], a[2], torch.ones(2), None), "weight_scale_2"),
        (lambda a: (a[0][:, :-2], a[1], a[2], a[3], None), "x must"),
        (lambda a: (a[0].to(torch.int32), a[1], a[2], a[3], None), "x must"),
        (lambda a: (a[0], a[1], a[2], a[3], torch.zeros(31)), "bias"),
        (lambda a: (a[0], a[1].t().contiguous().t(), a[2], a[3], None), "contiguous"),
        (lambda a: (a[0], a[1], a[2], a[3].to("meta"), None), "one device"),
    ],
)
def test_rejects_bad_arguments(change, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        nvfp4_matmul.nvfp4_linear(*change(_args()))


@pytest.fixture(scope="module")
def interpreted():
    """The module, whose kernels run on CPU tensors under Triton's interpreter."""
    pytest.importorskip("triton")
    return nvfp4_matmul


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).abs().max() / ref.abs().max())


# Not bf16: the interpreter truncates float32 -> bf16, the GPU rounds to nearest even (the bench checks it).
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dequantize_kernel_matches_codec_bit_for_bit(interpreted, dtype: torch.dtype) -> None:
    q = _weight(40, 96)  # N and K not multiples of the kernel's tile
    out = interpreted.dequantize(q.packed, q.weight_scale, q.weight_scale_2, dtype)
    assert torch.equal(out, nvfp4.dequantize_weight(q, dtype))


@pytest.mark.parametrize(
    ("config", "x_dtype"),
    [
        (KernelConfig(block_m=16, block_n=16, block_k=32), torch.float16),
        (KernelConfig(block_m=16, block_n=32, block_k=64, split_k=3), torch.float32),
        (KernelConfig(block_m=16, block_n=16, block_k=32, kernel="pipelined"), torch.float16),
        (KernelConfig(block_m=16, block_n=32, block_k=64, split_k=3, kernel="pipelined"), torch.float32),
        (KernelConfig(block_m=16, block_n=16, block_k=64, kernel="gemv"), torch.float32),
        (KernelConfig(block_m=16, block_n=16, block_k=32, kernel="dot", join=True, swap=True), torch.float16),
        (KernelConfig(block_m=32, block_n=32, block_k=64, split_k=3, kernel="dot", join=True, swap=True), torch.float16),
        (KernelConfig(block_m=16, block_n=32, block_k=64, split_k=3, kernel="pipelined", swap=True), torch.float16),
        (KernelConfig(block_m=32, block_n=64, block_k=64, split_k=3, kernel="wgmma"), torch.float16),  # as dot, swap
    ],
)
@pytest.mark.parametrize("m", [1, 5, 17, 33])
def test_fused_kernels_match_fp32_reference(interpreted, config: KernelConfig, x_dtype: torch.dtype, m: int) -> None:
    n, k = 40, 208  # K = 13 blocks: a partial last K tile, and splits of unequal length
    q = _weight(n, k, seed=m)
    gen = torch.Generator().manual_seed(100 + m)
    x = torch.randn(m, k, generator=gen).to(x_dtype)
    bias = torch.randn(n, generator=gen)
    ref = x.float() @ nvfp4.dequantize_weight(q, torch.float32).T + bias
    out = interpreted.fused_matmul(x, q.packed, q.weight_scale, q.weight_scale_2, bias, config, torch.float32)
    assert _relative_error(out, ref) < 1e-5


@pytest.mark.parametrize("m", [3, 20, 100, 130])  # decode: GEMV (split K), pipelined, 128-row tile; prefill
def test_nvfp4_linear_dispatch(interpreted, m: int) -> None:
    n, k = 48, 128
    q = _weight(n, k, seed=7)
    x = torch.randn(m, 1, k, generator=torch.Generator().manual_seed(m))
    out = interpreted.nvfp4_linear(x, q.packed, q.weight_scale, q.weight_scale_2)
    ref = x @ nvfp4.dequantize_weight(q, torch.float32).T
    assert out.shape == (m, 1, n) and out.dtype == x.dtype
    assert _relative_error(out, ref) < 1e-5


def test_empty_input(interpreted) -> None:
    x, packed, scale, scale_2 = _args()
    out = interpreted.nvfp4_linear(x[:0].bfloat16(), packed, scale, scale_2)
    assert out.shape == (0, 32) and out.dtype == torch.bfloat16


@pytest.mark.parametrize(("m", "n", "k"), [(20, 4096, 64), (20, 48, 128), (100, 48, 128), (100, 64, 32)])
def test_pipelined_candidate_shapes_compute_the_product(interpreted, m: int, n: int, k: int) -> None:
    """The pipelined tile's launch shapes (the next A/B's candidate, not the default) give the fp32 product."""
    config = interpreted.pipelined_config(m, n, k)
    assert config.kernel in ("pipelined", "dot")
    q = _weight(n, k, seed=m + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)).to(torch.float16)
    ref = x.float() @ nvfp4.dequantize_weight(q, torch.float32).T
    out = interpreted.fused_matmul(x, q.packed, q.weight_scale, q.weight_scale_2, None, config, torch.float32)
    assert _relative_error(out, ref) < 1e-5


@pytest.mark.parametrize("m", [5, 16, 17, 64, 100, 128])
@pytest.mark.parametrize(("n", "k"), [(4096, 4096), (14336, 4096), (4096, 14336)])
def test_large_weights_at_16_bit_x_take_the_wgmma_tile_or_the_swapped_one(m: int, n: int, k: int) -> None:
    """The measured winner on large weights at M = 5-128 (M <= 4 on 4096 x 4096: the GEMV): the Gluon tile, a
    launch shape it accepts; where it cannot run, the swapped Triton tile."""
    config = nvfp4_matmul.decode_config(m, n, k, 132, 2)
    assert config.kernel == "wgmma"
    nvfp4_launch_shapes.check_wgmma_config(config)
    assert config.block_m >= m and k % (config.block_k * config.split_k) == 0
    fallback = nvfp4_launch_shapes.swap_config(m, n, k)
    assert fallback.kernel == "dot" and fallback.join and fallback.swap
    assert fallback.block_m >= m and k % (fallback.block_k * fallback.split_k) == 0


@pytest.mark.parametrize("m", [5, 100])
def test_fp32_x_and_small_weights_keep_the_x_first_tile(interpreted, m: int) -> None:
    assert not interpreted.decode_config(m, 4096, 4096, 132, 4).swap
    assert not interpreted.decode_config(m, 1024, 4096, 132, 2).swap
    assert interpreted.decode_config(2, 4096, 4096, 132, 2).kernel == "gemv"


@pytest.mark.parametrize("config", [KernelConfig(16, 16, 32, kernel="dot", swap=True), KernelConfig(16, 16, 64, kernel="gemv", swap=True)])
def test_swap_is_refused_where_no_kernel_computes_it(config: KernelConfig) -> None:
    x, packed, scale, scale_2 = _args()
    with pytest.raises(ValueError, match="swap=True needs"):
        nvfp4_matmul.fused_matmul(x, packed, scale, scale_2, None, config)


@pytest.mark.parametrize("config", [KernelConfig(16, 16, 32, kernel="legacy"), KernelConfig(64, 64, 64, kernel="wgmma ")])
def test_unknown_kernels_are_refused(config: KernelConfig) -> None:
    x, packed, scale, scale_2 = _args()
    with pytest.raises(ValueError, match="kernel must be"):
        nvfp4_matmul.fused_matmul(x, packed, scale, scale_2, None, config)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (KernelConfig(64, 64, 64, num_stages=2, kernel="wgmma"), "num_stages .* >= 3"),
        (KernelConfig(128, 128, 128, num_stages=6, kernel="wgmma"), "shared memory"),  # 6 x 41,984 bytes
        (KernelConfig(64, 64, 32, kernel="wgmma"), "block_k 64 or 128"),
    ],
)
def test_wgmma_configs_that_cannot_launch_are_refused(config: KernelConfig, message: str) -> None:
    x, packed, scale, scale_2 = _args()
    with pytest.raises(ValueError, match=message):
        nvfp4_matmul.fused_matmul(x, packed, scale, scale_2, None, config)


def test_the_wgmma_tile_runs_only_on_16_byte_aligned_rows(monkeypatch) -> None:
    """Its copies are whole 16-byte vectors: a misaligned x, code or scale tensor, or K off 256, takes the Triton tile."""
    monkeypatch.setattr(nvfp4_matmul, "gluon_decode", object())
    monkeypatch.setattr(nvfp4_matmul, "_INTERPRET", False)
    monkeypatch.setattr(nvfp4_matmul, "_is_hopper", lambda device: True)
    q = _weight(64, 512, seed=1)
    x = torch.randn(8, 520, dtype=torch.bfloat16)
    assert nvfp4_matmul._wgmma_runs(x[:, :512].contiguous(), q.packed, q.weight_scale)
    assert not nvfp4_matmul._wgmma_runs(x[:, :512], q.packed, q.weight_scale)  # a row stride of 520, not 16k elements
    assert not nvfp4_matmul._wgmma_runs(x.flatten()[1:4097].view(8, 512), q.packed, q.weight_scale)  # 2 bytes off
    assert not nvfp4_matmul._wgmma_runs(x[:, :512].float(), q.packed, q.weight_scale)
    shifted = torch.empty(q.packed.numel() + 16, dtype=torch.uint8)[4:4 + q.packed.numel()].view_as(q.packed)
    shifted.copy_(q.packed)
    assert not nvfp4_matmul._wgmma_runs(x[:, :512].contiguous(), shifted, q.weight_scale)  # codes 4 bytes off
    scales = torch.empty(q.weight_scale.numel() + 16, dtype=torch.uint8)[4:4 + q.weight_scale.numel()]
    scales = scales.view(torch.float8_e4m3fn).view_as(q.weight_scale)
    scales.copy_(q.weight_scale)
    assert not nvfp4_matmul._wgmma_runs(x[:, :512].contiguous(), q.packed, scales)  # scales 4 bytes off
    q_short = _weight(64, 384, seed=2)  # K = 384: not whole 256-k blocks
    assert not nvfp4_matmul._wgmma_runs(x[:, :384].contiguous(), q_short.packed, q_short.weight_scale)


@pytest.mark.parametrize("config", [KernelConfig(16, 32, 64, split_k=3), KernelConfig(32, 32, 64, split_k=3, kernel="dot", join=True, swap=True),
                                    KernelConfig(32, 64, 64, split_k=3, kernel="wgmma")])  # fmt: skip
def test_split_k_finishes_in_its_launch_and_leaves_the_workspace_clean(interpreted, config: KernelConfig) -> None:
    """The last split to arrive writes the output dtype and zeroes sums and counters for the next launch."""
    from checkpoint_formats import split_k_workspace

    n, k = 40, 208
    q = _weight(n, k, seed=3)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(4))
    ref_weight = nvfp4.dequantize_weight(q, torch.float32)
    for m in (5, 33, 5):  # a second, larger launch and a repeat reuse the same workspace
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(torch.float16)
        out = interpreted.fused_matmul(x, q.packed, q.weight_scale, q.weight_scale_2, bias, config)
        assert out.dtype == torch.float16
        assert _relative_error(out, x.float() @ ref_weight.T + bias) < 1e-3
        workspace = split_k_workspace.workspace_for(x.device, m * n, 1)
        assert not workspace.sums.any() and not workspace.arrivals.any()


def test_split_k_without_a_workspace_adds_into_a_zeroed_fp32_output(interpreted, monkeypatch) -> None:
    from checkpoint_formats import split_k_workspace

    monkeypatch.setattr(split_k_workspace, "workspace_for", lambda *args: None)
    n, k = 40, 208
    q = _weight(n, k, seed=5)
    x = torch.randn(17, k, generator=torch.Generator().manual_seed(6)).to(torch.float16)
    out = interpreted.fused_matmul(x, q.packed, q.weight_scale, q.weight_scale_2, None, KernelConfig(16, 32, 64, split_k=3))
    assert out.dtype == torch.float16
    assert _relative_error(out, x.float() @ nvfp4.dequantize_weight(q, torch.float32).T) < 1e-3


@pytest.mark.parametrize("bias", [False, True])
def test_prefill_dequantizes_a_slice_of_rows_at_a_time(interpreted, monkeypatch, bias: bool) -> None:
    """Above the slice size the prefill holds one slice of W at a time; the product is the unsliced one's."""
    n, k = 200, 64
    q = _weight(n, k, seed=9)
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(150, k, generator=gen)
    b = torch.randn(n, generator=gen) if bias else None
    whole = interpreted.nvfp4_linear(x, q.packed, q.weight_scale, q.weight_scale_2, b)
    shapes = []
    dequantize = interpreted.dequantize
    monkeypatch.setattr(interpreted, "dequantize", lambda p, *rest: shapes.append(p.shape[0]) or dequantize(p, *rest))
    monkeypatch.setattr(interpreted, "PREFILL_SLICE_BYTES", 64 * k * 4)  # 64 fp32 rows
    sliced = interpreted.nvfp4_linear(x, q.packed, q.weight_scale, q.weight_scale_2, b)
    assert shapes == [64, 64, 64, 8]
    # the same fp32 dot products; CPU BLAS may block an 8-column slice differently (seen: 2.5e-5 absolute, torch 2.13)
    torch.testing.assert_close(sliced, whole, rtol=1e-5, atol=1e-5 * float(whole.abs().max()))


def test_a_broken_kernel_module_fails_the_import_instead_of_falling_back(tmp_path) -> None:
    """Only a missing Triton selects the pure-torch path: a Triton whose kernels cannot be imported is an error
    (swallowing it once made every packed matmul silently 7x slower on a GPU)."""
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "triton").mkdir()
    (tmp_path / "triton" / "__init__.py").write_text("")  # a Triton without triton.language
    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", "from checkpoint_formats import nvfp4_matmul"],
        env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{repo}"}, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode != 0 and "triton.language" in result.stderr
