"""Loading the model to abliterate, whatever form it comes in.

Quantized checkpoints (ModelOpt NVFP4 / W4A16 / FP8, compressed-tensors) go
through our formats loader (transformers cannot read ModelOpt NVFP4 at all),
either **packed** (the 4/8-bit weights stay as stored, a GPU kernel dequantizes
inside the matmul, PEFT attaches the edit as a side path: ~3.5x less memory
than bf16) or **dequantized** (a bf16 copy of every weight: the only fast path
on a CPU, where no such kernel exists). Everything else goes through
``from_pretrained``. Dtypes are tried in order; a dtype that
loads but gives NaN/inf logits on a one-token test generation (fp16 overflow,
broken scales) is rejected before any expensive work starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer

from abliterate.quantization.options import NVFP4, QuantizationRequest
from checkpoint_formats.integrity import check_safetensors_folder
from checkpoint_formats.placement import input_device
from checkpoint_formats.sibling_fusion import fuse_siblings
from foundation.devices import require_visible_device
from foundation.dtypes import TORCH_DTYPES as _DTYPES
from foundation.errors import UserError
from foundation.hub_ids import looks_like_local_path
from foundation.load_report import require_complete_load
from foundation.weight_files import require_safetensors

LOAD_AS = ("auto", "packed", "dequantized")


def max_memory_for_accelerate(max_memory: dict | None) -> dict | None:
    """GPU indices as ints ("0" -> 0) and plain byte counts as ints ("374868" -> 374868): accelerate reads a
    string only with a unit, and a device key "0" only as an int."""
    if not max_memory:
        return None
    return {int(key) if str(key).isdigit() else key: int(size) if str(size).strip().isdigit() else size
            for key, size in max_memory.items()}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source_format: str  # "plain" or the formats loader's name for the checkpoint
    dtype: str
    held_as: str = "plain"  # "packed", "dequantized" or "plain"
    fused_groups: int = 0  # packed q/k/v and gate/up groups multiplied in one launch (checkpoint_formats.sibling_fusion)

    @property
    def resident_bytes(self) -> int:
        """Bytes of every parameter and buffer of the model (what its weights occupy on their devices)."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        seen = {t.data_ptr(): t.numel() * t.element_size() for t in tensors if t.device.type != "meta"}
        return sum(seen.values())


def choose_held_as(load_as: str, device_map) -> str:
    """``auto`` keeps a quantized checkpoint packed where a matmul kernel runs on it (a GPU), else dequantizes."""
    if load_as not in LOAD_AS:
        raise UserError("--load_as", f"unknown choice {load_as!r}", f"choose one of: {', '.join(LOAD_AS)}")
    if load_as != "auto":
        return load_as
    from abliterate.quantization.device_check import target_device_type

    return "packed" if target_device_type(device_map) == "cuda" else "dequantized"


def _quantized_format(path: str) -> str | None:
    """The checkpoint's format description if the formats loader should read it, else None."""
    if not Path(path).is_dir():
        return None
    from checkpoint_formats.detect import detect_format

    checkpoint_format = detect_format(path)
    return checkpoint_format.describe() if checkpoint_format.kind.is_quantized else None


def _load_once(path: str, dtype_name: str, quantized: str | None, device_map, max_memory, trust_remote_code: bool,
               quantization: QuantizationRequest | None = None, held_as: str = "dequantized",
               offload_folder: str | None = None):
    if quantization is not None and quantization.enabled:
        return _load_quantizing(path, dtype_name, quantization, device_map, max_memory, trust_remote_code)
    if quantized is not None:
        from checkpoint_formats.loader import load_checkpoint

        dtype = torch.bfloat16 if dtype_name in {"auto", "fp8"} else _DTYPES[dtype_name]
        model, _ = load_checkpoint(path, dequantize=held_as != "packed", dtype=dtype, device_map=device_map,
                                   max_memory=max_memory, trust_remote_code=trust_remote_code)
        return model
    # 'fp8' on an ordinary checkpoint: keep whatever the checkpoint stores (its
    # own quantization config decides); never pass 'fp8' on as a torch dtype.
    dtype = "auto" if dtype_name == "fp8" else _DTYPES[dtype_name]
    model, loading_info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map, max_memory=max_memory,
                                                               offload_folder=offload_folder, trust_remote_code=trust_remote_code,
                                                               output_loading_info=True, use_safetensors=True)
    require_complete_load(loading_info, path, "--model")  # never search on random weights
    return model


def _load_quantizing(path: str, dtype_name: str, quantization: QuantizationRequest, device_map, max_memory,
                     trust_remote_code: bool):
    """--quantization: torchao / bitsandbytes inside from_pretrained, NVFP4 packed after a CPU load."""
    from abliterate.quantization.apply import (
        compute_dtype,
        load_nvfp4,
        quantization_config,
    )
    from abliterate.quantization.device_check import target_device_type

    dtype = compute_dtype("auto" if dtype_name == "fp8" else _DTYPES[dtype_name])
    if quantization.option == NVFP4:
        return load_nvfp4(path, quantization, dtype, device_map, max_memory, trust_remote_code)
    config = quantization_config(quantization, dtype, target_device_type(device_map))
    model, loading_info = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, device_map=device_map, max_memory=max_memory, trust_remote_code=trust_remote_code,
        quantization_config=config, output_loading_info=True, use_safetensors=True)
    require_complete_load(loading_info, path, "--model")
    return model


def _check_quantization(quantized: str | None, quantization: QuantizationRequest, device_map) -> None:
    """Refuse before loading: a checkpoint that is quantized already, or a config this device cannot run."""
    from abliterate.quantization.device_check import check_runs_here, device_facts

    if quantized is not None:
        raise UserError("--quantization", f"the model is already quantized ({quantized}); quantizing it again on load "
                        "would stack two rounding errors", "drop --quantization (stage-1 checkpoints load as they are)")
    check_runs_here(quantization, device_facts(device_map))


def check_config_readable(path: str, trust_remote_code: bool):
    """The config must name an architecture this transformers knows (an unknown model_type failed once per dtype)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as error:
        text = ". ".join(" ".join(line.strip() for line in str(error).splitlines() if line.strip()).split(". ")[:2])
        model_type = _model_type(path)
        fix = ("this transformers does not know that architecture: upgrade transformers, or pass --trust_remote_code "
               "if the model repository ships its own code (only for repositories you trust)")
        raise UserError("--model", f"cannot read the config of {path}" + (f" (model_type {model_type!r})" if model_type else "")
                        + f": {text}", fix) from None
    except OSError:
        return None  # a Hub id without network, a gated repo: the tokenizer load below says so in its own words


def check_group_size_fits(config, quantization: QuantizationRequest) -> None:
    """torchao int4 groups each Linear's input dimension: a group size that does not divide it fails in every layer."""
    from abliterate.quantization.options import TORCHAO_INT4_WEIGHT_ONLY

    text_config = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    if text_config is None or quantization.option != TORCHAO_INT4_WEIGHT_ONLY:
        return
    sizes = {name: getattr(text_config, name, None) for name in ("hidden_size", "intermediate_size", "moe_intermediate_size")}
    bad = {name: size for name, size in sizes.items() if isinstance(size, int) and size % quantization.group_size}
    if bad:
        listed = ", ".join(f"{name} {size}" for name, size in bad.items())
        good = [size for size in (32, 64, 128, 256) if all(value % size == 0 for value in bad.values())]
        raise UserError("--torchao_group_size", f"group size {quantization.group_size} does not divide this model's "
                        f"Linear input sizes ({listed})",
                        f"pass --torchao_group_size {good[-1]}" if good else "pass another --quantization option")


def _model_type(path: str) -> str | None:
    import json

    try:
        return json.loads((Path(path) / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


@torch.no_grad()
def non_finite_tensors(model: torch.nn.Module) -> list[str]:
    """Names of the model's floating-point parameters and buffers that hold NaN / inf."""
    return [name for name, tensor in [*model.named_parameters(), *model.named_buffers()]
            if tensor.is_floating_point() and tensor.device.type != "meta" and not torch.isfinite(tensor).all()]


def _listed(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


@torch.inference_mode()
def check_generates_finite(model, tokenizer) -> None:
    """One token of a real chat prompt; raises ValueError on NaN/inf logits."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    else:
        ids = tokenizer("Hello", return_tensors="pt")["input_ids"]
    device = input_device(model)  # not the first parameter's: meta when accelerate offloaded it
    output = model.generate(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device), max_new_tokens=1,
                            do_sample=False, output_logits=True, return_dict_in_generate=True,
                            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    logits = output.logits[0]
    if not torch.isfinite(logits).all():
        raise ValueError("NaN/inf logits on a one-token test generation")


def load_model(path: str, *, dtypes: Sequence[str], device_map: str | None = "auto", max_memory: dict | None = None,
               trust_remote_code: bool = False, quantization: QuantizationRequest | None = None,
               load_as: str = "auto", offload_folder: str | None = None, sibling_fusion: bool = False) -> LoadedModel:
    if not Path(path).exists() and looks_like_local_path(path):
        raise UserError("--model", f"{path} does not exist", "give a local model folder or a Hub id (org/name)")
    if Path(path).is_file():  # else transformers reads it as a config and reports invalid JSON
        raise UserError("--model", f"{path} is a file, not a model folder",
                        "give the folder that holds config.json (or a Hub id org/name)")
    require_safetensors(path, "--model")  # before any load: a pickle would run code in torch.load
    require_visible_device(device_map)  # --device_map cuda on a machine without a GPU: now, not once per dtype
    check_safetensors_folder(path, "--model")  # a truncated / corrupt shard: now, not as a SafetensorError per dtype
    config = check_config_readable(path, trust_remote_code)
    quantized = _quantized_format(path)
    held_as = choose_held_as(load_as, device_map) if quantized is not None else "plain"
    if quantization is not None and quantization.enabled:
        _check_quantization(quantized, quantization, device_map)
        check_group_size_fits(config, quantization)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise UserError("--model", f"cannot load the tokenizer of {path}: {error}", "check the path / Hub id") from None
    tokenizer.padding_side = "left"
    memory = max_memory_for_accelerate(max_memory)
    errors = []
    for dtype_name in dtypes:
        try:
            model = _load_once(path, dtype_name, quantized, device_map, memory, trust_remote_code, quantization, held_as,
                               offload_folder)
            model.eval()
        except UserError:
            raise
        except (ValueError, RuntimeError, TypeError, OSError, SafetensorError) as error:
            if "offload_folder" in str(error):  # the same for every dtype: say what to pass
                raise UserError("--offload_folder", "the device_map (with --max_memory) sends some weights to disk and "
                                "no --offload_folder was given", "pass --offload_folder DIR on a disk with room for them, "
                                "or give the GPUs / CPU more room (--max_memory)") from None
            errors.append(f"{dtype_name}: {str(error).splitlines()[0][:200] if str(error) else type(error).__name__}")
            continue
        # outside the load's try: a failure here (out of memory in the concatenation) is no reason to try another
        # dtype; before the test generation, so that the fused model is the one checked
        fused_groups = fuse_siblings(model) if held_as == "packed" and sibling_fusion else 0
        try:
            check_generates_finite(model, tokenizer)
        except ValueError as error:
            bad = non_finite_tensors(model)
            if bad and _DTYPES.get(dtype_name) != torch.float16:  # in the checkpoint itself: no dtype will help
                raise UserError("--model", f"{path} holds NaN or inf values in {len(bad)} tensor(s): {_listed(bad)}",
                                "the checkpoint is corrupt or was badly converted: re-download or re-convert it "
                                "(check it with `quant-abliterate inspect`)") from None
            # float16 overflows where bf16 / fp32 do not (values beyond 65504 become inf): say which, try the next dtype
            errors.append(f"{dtype_name}: {error}" + (f" (not finite after the cast: {_listed(bad)})" if bad else ""))
            continue
        source_format = quantized or "plain"
        if quantization is not None and quantization.enabled:
            source_format = f"plain, quantized on load: {quantization.describe()}"
            held_as = f"quantized on load ({quantization.option})"
        return LoadedModel(model, tokenizer, source_format, dtype_name, held_as, fused_groups)
    reasons = {error.split(": ", 1)[1] for error in errors}
    if len(errors) > 1 and len(reasons) == 1:  # the same failure whatever the dtype: another --dtypes list cannot help
        raise UserError("--model", f"{path} did not load (the same error with every dtype of --dtypes): {reasons.pop()}",
                        "check the checkpoint and the flags (--device_map, --max_memory, --quantization)")
    raise UserError("--model", f"{path} did not load with any dtype of --dtypes:\n    " + "\n    ".join(errors),
                    "try another --dtypes list (e.g. '[\"float32\"]'), or check the checkpoint")
