"""Build a calibration set from a mix: draw, render, tokenize, filter, trim.

The steps (and their counts in the summary table):
1. request ceil(max_samples * oversample_ratio) rows, split by normalized weights;
2. render each row to text (formatter) and tokenize it, truncated to max_seq_len;
3. drop samples shorter than min_token_length;
4. keep exactly max_samples, still split by weight where the data allows,
   in one seeded shuffled order. Too few left: warn with the counts and go on,
   unless fewer than ``min_samples`` survived: then stop with a UserError that
   names each dataset and the filter that emptied it.
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
from foundation.text_files import is_blank_file, require_utf8
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
    min_samples: int | None = None,
) -> CalibrationSet:
    """Token ids for calibration. Overrides left at None take the YAML's value.

    ``min_samples``: fewer surviving samples than this is a UserError (None: only warn).
    """
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
        loaded, formatter, kept, no_text = _draw_dataset(entry, count, tokenizer, settings, where, console)
        kept_per_dataset.append(kept)
        counts.append(
            {"requested": count, "loaded": loaded, "kept": len(kept), "formatter": formatter,
             "source": _short_source(entry), "weight": entry.weight,
             "no_text": no_text, "too_short": loaded - no_text - len(kept)}
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
    if min_samples is not None and len(samples) < min_samples:
        result.print_summary(console)
        raise too_few_samples_error(result, min_samples, file_label)
    if len(samples) < settings.max_samples:
        _warn_too_few(result, console)
    return result


def too_few_samples_error(result: CalibrationSet, min_samples: int, file_label: str) -> UserError:
    """Which dataset lost its rows to which filter, and what to change."""
    s = result.settings
    reasons, fixes = [], []
    for name, c in result.per_dataset.items():
        if c.requested == 0:
            continue
        parts = [f"{c.loaded} of {c.requested} rows read"]
        if c.no_text:
            parts.append(f"{c.no_text} with no text (null or empty in the column the '{c.formatter}' formatter reads)")
        if c.too_short:
            parts.append(f"{c.too_short} shorter than min_token_length={s.min_token_length} tokens "
                         f"(samples are cut at max_seq_len={s.max_seq_len})")
        parts.append(f"{c.kept} kept")
        reasons.append(f"{name} ({c.source}): " + ", ".join(parts))
    per_dataset = result.per_dataset.values()
    if any(c.too_short for c in per_dataset):
        fixes.append(f"lower min_token_length (--min_token_length, now {s.min_token_length}) or use longer texts")
    if any(c.no_text for c in per_dataset):
        fixes.append("point text_column / columns / formatter at the field that holds the text, or drop the empty rows")
    if any(c.loaded < c.requested for c in per_dataset):
        fixes.append("add rows or raise oversample_ratio")
    fixes.append(f"or, to calibrate on what is left anyway, pass --min_calibration_samples {max(1, len(result))}")
    return UserError(
        file_label,
        f"only {len(result)} of {s.max_samples} calibration samples survived the filters, fewer than the "
        f"{min_samples} required (a checkpoint calibrated on {'no' if not result.samples else 'so few'} samples has "
        f"{'no activation scales' if not result.samples else 'unreliable activation scales'}): " + "; ".join(reasons),
        "; ".join(fixes),
    )


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
) -> tuple[int, str, list[list[int]], int]:
    """(rows loaded, formatter used, token ids kept after the length filter, rows that rendered to no text)."""
    if count == 0:
        return 0, entry.formatter or "-", [], 0
    console.print(f"[dim]calibration: drawing {count} rows from {escape(entry.name)} ({escape(entry.path)})[/]")
    check_local_text_file(entry.path, f"{where}, field 'path'")
    dataset = open_dataset(entry, where)
    try:
        plan = plan_format(entry, column_names(dataset))
    except ColumnProblem as problem:
        raise UserError(f"{where}, field '{problem.field}'", problem.problem, problem.fix) from None
    rows = take_rows(dataset, count, dataset_seed(settings.seed, entry.name))
    rendered = [render_row(plan, row, tokenizer) for row in rows]
    token_ids = tokenize(rendered, tokenizer, settings.max_seq_len)
    kept = [ids for ids in token_ids if ids is not None and len(ids) >= settings.min_token_length]
    no_text = sum(1 for ids in token_ids if not ids)
    return len(rows), plan.formatter, kept, no_text


TEXT_SUFFIXES = (".json", ".jsonl", ".csv", ".txt")


def check_local_text_file(path: str, where: str) -> None:
    """A local text data file must be UTF-8 and hold something: else `datasets` fails with a
    UnicodeDecodeError (inside pyarrow, after loading) or a bare 'StopIteration'."""
    file = Path(path)
    if not file.is_file() or file.suffix.lower() not in TEXT_SUFFIXES:
        return
    if is_blank_file(file):
        raise UserError(where, f"{file} is empty: it holds no rows",
                        "add data to the file, or remove this entry from the mix (or give it weight: 0)")
    require_utf8(file, where)


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
