"""The calibration forward loop: the mix's token ids, batched, through the model.

ModelOpt collects activation ranges through hooks during whatever forward
passes we run, so the loop is just "run every calibration batch once". It
sends each batch to the device of the model's input embedding, which is
right for a model on one device and for an accelerate device map alike
(accelerate's hooks move activations between devices from there on).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from foundation.errors import UserError
from quantize import max_statistics

FORWARD_RANGE = "quantize::calibration_forward"  # a torch.profiler range per batch (bench/calibration_bench.py)


class SamplesPerSecondColumn(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-- samples/s" if speed is None else f"{speed:.1f} samples/s")


def model_input_device(model: torch.nn.Module) -> torch.device:
    """Device where input ids must live: the embedding's execution device under an accelerate map (its weight
    may be on "meta"), else the embedding's weight's (see ``checkpoint_formats.placement.input_device``)."""
    from checkpoint_formats.placement import input_device

    return input_device(model)


def make_forward_loop(
    calibration_set,
    batch_size: int,
    pad_token_id: int,
    console: Console | None = None,
    description: str = "calibrating",
    fast_max: bool = False,
    check_every: int = 32,
    lean_linears: bool = True,
) -> Callable[[torch.nn.Module], None]:
    """A ``forward_loop(model)`` for ``mtq.quantize``; each call is one full pass.

    Layerwise calibration calls it once per decoder layer, so every call gets
    its own progress bar line and counts its own pass number. The batches are
    built once and sent to the model's input device once per pass, ahead of
    the forward passes. ``fast_max`` (for the ``max`` algorithm only, where
    weights stay constant) runs each pass inside
    ``max_statistics.fast_max_collection``: the same statistics without
    ModelOpt's per-quantizer host syncs and repeated weight reductions,
    checked for NaN/inf every ``check_every`` batches and at the end, and
    (``lean_linears``) with ModelOpt's per-Linear Python replaced by the
    equivalent collect + ``F.linear`` where that is exact.
    """
    passes = {"count": 0}
    total = len(calibration_set.samples)
    host_batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    @torch.no_grad()
    def forward_loop(model: torch.nn.Module) -> None:
        passes["count"] += 1
        device = model_input_device(model)
        label = description if passes["count"] == 1 else f"{description} (pass {passes['count']})"
        if not host_batches:
            host_batches.extend(calibration_set.batches(batch_size, pad_token_id))
        batches = [(ids.to(device), mask.to(device)) for ids, mask in host_batches]
        collection = (max_statistics.fast_max_collection(model, lean_linears=lean_linears) if fast_max
                      else contextlib.nullcontext())
        with Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), SamplesPerSecondColumn(),
            TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False, disable=console is None,
        ) as progress, collection as statistics:
            task = progress.add_task(label, total=total)
            for number, (input_ids, attention_mask) in enumerate(batches, start=1):
                with torch.profiler.record_function(FORWARD_RANGE):
                    model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                progress.advance(task, input_ids.shape[0])
                if statistics is not None and (number % check_every == 0 or number == len(batches)):
                    statistics.check_finite()

    return forward_loop


def calibrate(model: torch.nn.Module, quant_config: dict, forward_loop,
              skip_offload_writeback: bool = False) -> tuple[torch.nn.Module, float]:
    """Insert quantizers and calibrate them; returns the model and the seconds taken.

    ``skip_offload_writeback``: the algorithm only reads the weights (``AlgorithmRecipe.keeps_weights``), so
    ModelOpt's writeback of accelerate-offloaded weights is skipped (see ``offload_writeback_skipped``)."""
    import modelopt.torch.quantization as mtq

    started = time.perf_counter()
    try:
        with offload_writeback_skipped(skip_offload_writeback):
            model = mtq.quantize(model, quant_config, forward_loop)
    except (AssertionError, RuntimeError) as error:
        raise explain_calibration_failure(error) from error
    return model, time.perf_counter() - started


WRITEBACK_MODULE = "modelopt.torch.quantization.plugins.accelerate"
WRITEBACK_FUNCTION = "_writeback_params_to_weights_map"


def offload_writeback_can_be_skipped() -> bool:
    """Whether the pinned ModelOpt has the writeback function that ``offload_writeback_skipped`` replaces."""
    import importlib

    try:
        return callable(getattr(importlib.import_module(WRITEBACK_MODULE), WRITEBACK_FUNCTION, None))
    except ImportError:
        return False


@contextmanager
def offload_writeback_skipped(enabled: bool = True) -> Iterator[None]:
    """Within: ModelOpt does not write accelerate-offloaded weights back into accelerate's ``weights_map``.

    Why (ModelOpt 0.47, ``plugins/accelerate.py``): ``max_calibrate`` runs ``weight_only_quantize``, which opens
    ``enable_weight_access_and_writeback(module, model)`` (writeback on) around every quantized linear; on exit
    ``weight_access_and_writeback_context`` calls ``_writeback_params_to_weights_map``, which stores
    ``tensor.detach().to(cpu)`` for every CPU-offloaded weight (materialized on the execution GPU: a fresh
    anonymous copy replacing accelerate's mmapped one) and ``tensor.detach().cpu()`` for every *disk*-offloaded
    weight, promoted into the loader's in-memory ``state_dict`` ("writing updates back to disk offload files is
    TODO"). At Llama-3.1-70B layer sizes (8 CPU + 3 disk layers) that was 18.8 GB of anonymous memory beyond
    ``--max_cpu_memory``. An algorithm that only reads the weights has nothing to write back, so the writeback is
    replaced by a no-op while it calibrates; weight-changing algorithms keep it (the planner then reserves the
    disk layers' bytes from the CPU budget: ``quantize.offload.plan_placement(disk_writeback=True)``).
    """
    if not enabled or not offload_writeback_can_be_skipped():
        yield
        return
    import importlib

    plugin = importlib.import_module(WRITEBACK_MODULE)
    original = getattr(plugin, WRITEBACK_FUNCTION)
    setattr(plugin, WRITEBACK_FUNCTION, lambda module, align_hook: None)
    try:
        yield
    finally:
        setattr(plugin, WRITEBACK_FUNCTION, original)


def explain_calibration_failure(error: BaseException) -> BaseException:
    """ModelOpt's own assertions, as the UserError they mean; anything else unchanged (a real bug)."""
    text = str(error).lower()
    if "nan" in text or ("inf" in text and "amax" in text):
        return UserError(
            "--input_model",
            f"ModelOpt found NaN or inf values while calibrating ({str(error).strip() or type(error).__name__}): "
            "the model's weights, or its activations on the calibration data, are not finite",
            "check the source weights (a NaN/inf tensor means a corrupt or badly converted checkpoint: re-download "
            "or re-convert it); with --dtype float16, try --dtype bfloat16 (float16 activations overflow)",
        )
    if "no weight quantizer" in text:
        return UserError(
            "--skip_layers",
            "ModelOpt enabled no weight quantizer: the skip patterns and the format together leave nothing to quantize",
            "keep fewer layers in full precision (--skip_layers), or pick a --format that targets this model's layers "
            "(see --list_configs)",
        )
    return error
