"""Linear layers that keep their quantized weights packed and dequantize on the fly.

They hold exactly the tensors of the checkpoint (same names, so ``state_dict``
reads like the file) and cost ~3.5x less memory than bf16. The forward pass
dequantizes the weight into the compute dtype, optionally rounding the input
the way the deployed kernel would (``simulate_activations``): NVFP4 blocks for
W4A4, FP8 per tensor for W4A8 and FP8 checkpoints. That lets a CPU predict the
numerics of the served model. On a CUDA device NVFP4 weights never exist in
bf16: ``nvfp4_matmul`` dequantizes inside the matmul kernel. PEFT attaches
LoRA to them as a custom module (``abliterate/quantization/lora_support.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from checkpoint_formats import fp8, nvfp4, nvfp4_matmul

ACTIVATION_MODES = (None, "nvfp4", "fp8")


class _QuantizedLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype,
        activation_mode: str | None,
        simulate: bool,
    ) -> None:
        super().__init__()
        if activation_mode not in ACTIVATION_MODES:
            raise ValueError(f"activation_mode must be one of {ACTIVATION_MODES}")
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = dtype
        self.activation_mode = activation_mode  # how the deployed kernel rounds inputs
        self.simulate_activations = simulate and activation_mode is not None
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device="meta")) if bias else None
        self.register_buffer("input_scale", None)
        self.register_buffer("pre_quant_scale", None)  # AWQ smoothing left unfolded by the export

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        raise NotImplementedError

    def _round_input(self, x: torch.Tensor) -> torch.Tensor:
        if not self.simulate_activations or self.input_scale is None:
            return x
        if self.activation_mode == "nvfp4":
            return nvfp4.fake_quantize_activation(x, self.input_scale)
        return fp8.fake_quantize_activation(x, self.input_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_quant_scale is not None:
            x = x * self.pre_quant_scale.to(x.dtype)
        x = self._round_input(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        output = self._kernel_linear(x, bias)
        if output is not None:
            return output
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def _kernel_linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        """A fused dequantize-and-multiply kernel's output where one runs on ``x``'s device, else None."""
        return None

    def to_linear(self) -> nn.Linear:
        """A plain Linear with the dequantized weight (what ``dequantize=True`` loads)."""
        weight = self.dequantized_weight(torch.float32)
        if self.pre_quant_scale is not None:
            weight = weight * self.pre_quant_scale.float()
        weight = weight.to(self.compute_dtype)
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=weight.device, dtype=weight.dtype
        )
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        simulated = self.activation_mode if self.simulate_activations else None
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, simulated_activations={simulated}"


class NVFP4Linear(_QuantizedLinear):
    """Buffers: ``weight`` uint8 [out, in/2], ``weight_scale`` e4m3 [out, in/block],
    ``weight_scale_2`` float32 [], ``input_scale`` float32 [] or None.

    ``shared_product``: set by ``sibling_fusion`` when this Linear's rows live in one buffer with its siblings'
    (q/k/v, gate/up), which are then multiplied in one launch."""

    shared_product = None  # a sibling_fusion.SharedProduct
    shared_index = 0  # its place in the group: which columns of the product are its output

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        block_size: int = nvfp4.DEFAULT_BLOCK_SIZE,
        dtype: torch.dtype = torch.bfloat16,
        activation_mode: str | None = None,
        simulate_activations: bool = False,
    ) -> None:
        super().__init__(in_features, out_features, bias, dtype, activation_mode, simulate_activations)
        self.block_size = block_size
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device="meta"))
        self.register_buffer(
            "weight_scale",
            torch.empty(out_features, in_features // block_size, dtype=torch.float8_e4m3fn, device="meta"),
        )
        self.register_buffer("weight_scale_2", torch.empty((), dtype=torch.float32, device="meta"))

    @property
    def quantized(self) -> nvfp4.NVFP4Weight:
        return nvfp4.NVFP4Weight(self.weight, self.weight_scale, self.weight_scale_2)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """On a GPU through the dequantization kernel (the same values, bit for bit): the pure-torch codec holds
        about three full-size fp32 temporaries, which were the peak of a trial's edit on an 8B model."""
        dtype = dtype or self.compute_dtype
        device = self.weight.device
        if device.type == "cuda" and self.kernel_block_size_ok and nvfp4_matmul.available(device):
            with torch.cuda.device(device):
                return nvfp4_matmul.dequantize(self.weight, self.weight_scale.contiguous(), self.weight_scale_2, dtype)
        return nvfp4.dequantize_weight(self.quantized, dtype)

    @property
    def kernel_block_size_ok(self) -> bool:
        """The Triton kernels read one E4M3 scale per 16 codes; W4A8 checkpoints carry 32-blocks (dequantize path)."""
        return self.block_size == nvfp4_matmul.KERNEL_BLOCK_SIZE

    def _kernel_linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        if self.shared_product is not None:  # fused only where the kernel runs (sibling_fusion.fusable)
            return self.shared_product.columns_of(self, x, bias)
        if not self.kernel_block_size_ok or x.device.type != "cuda" or not nvfp4_matmul.available(x.device):
            return None
        return nvfp4_matmul.nvfp4_linear(x, self.weight, self.weight_scale, self.weight_scale_2, bias)


class FP8Linear(_QuantizedLinear):
    """Buffers: ``weight`` float8_e4m3fn [out, in], ``weight_scale`` float32 [] (or [out, 1])."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        scale_shape: tuple[int, ...] = (),
        dtype: torch.dtype = torch.bfloat16,
        activation_mode: str | None = None,
        simulate_activations: bool = False,
    ) -> None:
        super().__init__(in_features, out_features, bias, dtype, activation_mode, simulate_activations)
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn, device="meta"))
        self.register_buffer("weight_scale", torch.empty(scale_shape, dtype=torch.float32, device="meta"))

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return fp8.dequantize_weight(fp8.FP8Weight(self.weight, self.weight_scale), dtype or self.compute_dtype)


def set_activation_simulation(model: nn.Module, enabled: bool) -> int:
    """Switch activation rounding on or off in every packed Linear; returns how many can simulate.

    With it off the model computes exactly what ``dequantize=True`` loads, so
    one loaded model serves as both the W4A4 simulation and its reference.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, _QuantizedLinear) and module.activation_mode is not None:
            module.simulate_activations = enabled
            count += 1
    return count
