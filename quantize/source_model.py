"""Load the source model's config, tokenizer and weights, with load failures as UserError."""

from __future__ import annotations

import torch
from safetensors import SafetensorError

from foundation.dtypes import TORCH_DTYPES
from foundation.errors import UserError
from foundation.load_report import require_complete_load


def resolve_device(requested: str) -> str:
    """'auto' -> first GPU if any; 'cuda' without a GPU is a user error."""
    cuda = torch.cuda.is_available()
    if requested == "cuda" and not cuda:
        raise UserError("--device", "cuda was requested but no CUDA GPU is visible", "use --device cpu or auto")
    if requested == "auto":
        return "cuda:0" if cuda else "cpu"
    return "cuda:0" if requested == "cuda" else "cpu"


def _load_error(input_model: str, error: Exception) -> UserError:
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())  # not cut at "from one of:"
    if len(text) > 600:
        text = text[:600] + " ..."
    return UserError(
        "--input_model",
        f"cannot load {input_model!r}: {type(error).__name__}: {text}",
        "check the path or Hub id (and HF_TOKEN for gated models; no network means only local directories work)",
    )


def load_config(input_model: str, revision: str | None, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(input_model, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise _load_error(input_model, error) from error


def load_tokenizer(input_model: str, revision: str | None, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(input_model, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise _load_error(input_model, error) from error


def load_model(
    input_model: str,
    *,
    dtype: str,
    revision: str | None,
    trust_remote_code: bool,
    device_map: dict | str | None = None,
    offload_folder: str | None = None,
) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        model, loading_info = AutoModelForCausalLM.from_pretrained(
            input_model,
            dtype=TORCH_DTYPES[dtype],
            revision=revision,
            trust_remote_code=trust_remote_code,
            device_map=device_map,
            offload_folder=offload_folder,
            use_safetensors=True,  # never a pickle (foundation.weight_files)
            output_loading_info=True,
        )
    except (OSError, ValueError, SafetensorError) as error:
        raise _load_error(input_model, error) from error
    require_complete_load(loading_info, input_model, "--input_model")  # never quantize random weights
    model.eval()
    return model


def stored_parameters(model: torch.nn.Module):
    """(name, tensor) of every parameter, offloaded ones read one at a time from accelerate's weights map."""
    for name, parameter in model.named_parameters():
        if parameter.device.type != "meta":
            yield name, parameter
            continue
        module_name, _, leaf = name.rpartition(".")
        weights_map = getattr(getattr(model.get_submodule(module_name), "_hf_hook", None), "weights_map", None)
        if weights_map is not None and leaf in weights_map:
            yield name, weights_map[leaf]


def require_finite_weights(model: torch.nn.Module, input_model: str) -> None:
    """NaN/inf in a weight would reach ModelOpt as a NaN amax (an assertion deep inside calibration) or, worse,
    a checkpoint that exports and serves garbage: refuse before calibrating, naming the tensors."""
    from checkpoint_formats.health import describe_names, nonfinite_tensors

    bad = nonfinite_tensors(stored_parameters(model))
    if bad:
        raise UserError("--input_model", f"{input_model} holds NaN/inf in {len(bad)} weight tensor(s): {describe_names(bad)}",
                        "fix or re-download the source model (a weight must be finite to be quantized)")


def pad_token_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate[0] if isinstance(candidate, list) else candidate)
    return 0
