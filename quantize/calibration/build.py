"""Build a calibration set from a mix: draw, render, tokenize, filter, trim.

The steps (and their counts in the summary table):
1. request ceil(max_samples * oversample_ratio) rows, split by normalized weights;
2. render each row to text (formatter) and tokenize it, truncated to max_seq_len;
3. drop samples shorter than min_token_length;
4. keep exactly max_samples, still split by weight where the data allows,
   in one seeded shuffled order. Too few left: warn with the counts, go on.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from foundation.dataset_sources import (
    column_names,
    open_dataset,
    resolve_source,
    take_rows,
)
from foundation.errors import UserError
from foundation.validation import FieldProblem, user_error_from_validation
from quantize.calibration.calibration_set import CalibrationSet, DatasetCount
from quantize.calibration.formatters import (
    ColumnProblem,
    RenderedText,
    plan_format,
    render_row,
)
from quantize.calibration.sampling import (
    allocate_used,
    dataset_seed,
    requested_total,
    seeded_shuffle,
    split_by_weights,
    token_ids_sha256,
)
from quantize.calibration.schema import (
    CalibrationMix,
    CalibrationSettings,
    DatasetEntry,
    load_mix,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def build_calibration_set(
    mix_path_or_mix: str | Path | CalibrationMix,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_samples: int | None = None,
    max_seq_len: int | None = None,
    seed: int | None = None,
    oversample_ratio: float | None = None,
    min_token_length: int | None = None,
    console: Console | None = None,
) -> CalibrationSet:
    """Token ids for calibration. Overrides left at None take the YAML's value."""
    mix = mix_path_or_mix if isinstance(mix_path_or_mix, CalibrationMix) else load_mix(mix_path_or_mix)
    console = console or Console(stderr=True)
    overrides = {
        "max_samples": max_samples,
        "max_seq_len": max_seq_len,
        "seed": seed,
        "oversample_ratio": oversample_ratio,
        "min_token_length": min_token_length,
    }
    settings = effective_settings(mix.calibration, overrides)
    file_label = str(mix.source_path) if mix.source_path else "calibration mix"

    weights = [entry.weight for entry in mix.datasets]
    requested = split_by_weights(requested_total(settings.max_samples, settings.oversample_ratio), weights)
    kept_per_dataset: list[list[list[int]]] = []
    counts: list[dict] = []
    for index, (entry, count) in enumerate(zip(mix.datasets, requested)):
        where = f"{file_label}: datasets[{index}] (name: {entry.name!r})"
        loaded, formatter, kept = _draw_dataset(entry, count, tokenizer, settings, where, console)
        kept_per_dataset.append(kept)
        counts.append(
            {"requested": count, "loaded": loaded, "kept": len(kept), "formatter": formatter,
             "source": _short_source(entry), "weight": entry.weight}
        )

    used = allocate_used(settings.max_samples, weights, [len(k) for k in kept_per_dataset])
    chosen = [
        (entry.name, sample)
        for entry, kept, n in zip(mix.datasets, kept_per_dataset, used)
        for sample in kept[:n]
    ]
    chosen = seeded_shuffle(chosen, settings.seed)
    samples = [sample for _, sample in chosen]
    per_dataset = {
        entry.name: DatasetCount(used=n, **count) for entry, count, n in zip(mix.datasets, counts, used)
    }
    result = CalibrationSet(
        samples=samples,
        per_dataset=per_dataset,
        token_ids_sha256=token_ids_sha256(samples),
        mix_sha256=mix.sha256,
        settings=settings,
        mix_path=str(mix.source_path) if mix.source_path else None,
        sample_sources=[name for name, _ in chosen],
    )
    if len(samples) < settings.max_samples:
        _warn_too_few(result, console)
    return result


def effective_settings(base: CalibrationSettings, overrides: dict[str, object]) -> CalibrationSettings:
    """The YAML's calibration block with the non-None overrides applied (and re-checked)."""
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return CalibrationSettings.model_validate({**base.model_dump(), **given})
    except ValidationError as error:
        def explain(detail: FieldProblem) -> tuple[str, str, str]:
            field = str(detail.loc[-1]) if detail.loc else next(iter(given), "calibration")
            problem = getattr(detail.own, "problem", None) or f"{detail.message} (got {detail.input!r})"
            fix = getattr(detail.own, "fix", None) or f"pass a valid value to --{field} or leave it out to use the mix file's"
            return f"calibration override {field}", problem, fix

        raise user_error_from_validation(error, explain) from None


def _draw_dataset(
    entry: DatasetEntry,
    count: int,
    tokenizer: PreTrainedTokenizerBase,
    settings: CalibrationSettings,
    where: str,
    console: Console,
) -> tuple[int, str, list[list[int]]]:
    """(rows loaded, formatter used, token ids kept after the length filter)."""
    if count == 0:
        return 0, entry.formatter or "-", []
    console.print(f"[dim]calibration: drawing {count} rows from {escape(entry.name)} ({escape(entry.path)})[/]")
    dataset = open_dataset(entry, where)
    try:
        plan = plan_format(entry, column_names(dataset))
    except ColumnProblem as problem:
        raise UserError(f"{where}, field '{problem.field}'", problem.problem, problem.fix) from None
    rows = take_rows(dataset, count, dataset_seed(settings.seed, entry.name))
    rendered = [render_row(plan, row, tokenizer) for row in rows]
    token_ids = tokenize(rendered, tokenizer, settings.max_seq_len)
    kept = [ids for ids in token_ids if ids is not None and len(ids) >= settings.min_token_length]
    return len(rows), plan.formatter, kept


def tokenize(
    texts: list[RenderedText | None], tokenizer: PreTrainedTokenizerBase, max_seq_len: int
) -> list[list[int] | None]:
    """Token ids per text (None stays None), truncated to `max_seq_len`.

    Chat-template output already holds BOS etc., so special tokens are added
    only to plain text; batched per kind for the fast tokenizer's speed.
    """
    result: list[list[int] | None] = [None] * len(texts)
    for with_special in (False, True):
        positions = [i for i, t in enumerate(texts) if t is not None and t.has_special_tokens == with_special]
        if not positions:
            continue
        encoded = tokenizer(
            [texts[i].text for i in positions],
            add_special_tokens=not with_special,
            truncation=True,
            max_length=max_seq_len,
        )["input_ids"]
        for i, ids in zip(positions, encoded):
            result[i] = list(ids)
    return result


def _short_source(entry: DatasetEntry) -> str:
    source = resolve_source(entry.path, Path.cwd())
    if source.kind == "hub":
        return source.location + (f" [{entry.subset}]" if entry.subset else "") + f" :{entry.split}"
    return Path(source.location).name


def _warn_too_few(result: CalibrationSet, console: Console) -> None:
    target = result.settings.max_samples
    lines = ", ".join(
        f"{name}: requested {c.requested}, loaded {c.loaded}, kept {c.kept}, used {c.used}"
        for name, c in result.per_dataset.items()
    )
    console.print(
        f"[bold yellow]warning:[/] only {len(result)} of {target} calibration samples survived "
        f"the min_token_length={result.settings.min_token_length} filter ({escape(lines)}). "
        "Continuing with fewer samples; to get the full count raise oversample_ratio, "
        "lower min_token_length, or add data."
    )
    result.print_summary(console)
