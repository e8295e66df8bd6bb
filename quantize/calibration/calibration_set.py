"""The product of a mix: token ids ready for a calibration loop, plus the
counts and hashes that go into the quantization manifest."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rich.markup import escape
from rich.table import Table

from quantize.calibration.schema import CalibrationSettings

if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from rich.console import Console


@dataclass(frozen=True)
class DatasetCount:
    """One dataset's journey: asked for, read, kept by the length filter, used."""

    requested: int
    loaded: int
    kept: int
    used: int
    source: str = ""
    formatter: str = ""
    weight: float = 0.0
    no_text: int = 0  # rows that rendered to no text (null / empty column, no usable messages)
    too_short: int = 0  # rows dropped by the min_token_length filter


@dataclass(frozen=True)
class CalibrationSet:
    samples: list[list[int]]
    per_dataset: dict[str, DatasetCount]
    token_ids_sha256: str
    mix_sha256: str
    settings: CalibrationSettings
    mix_path: str | None = None
    # Which dataset each sample came from (same order as `samples`).
    sample_sources: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_tokens(self) -> int:
        return sum(len(sample) for sample in self.samples)

    def batches(self, batch_size: int, pad_token_id: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(input_ids, attention_mask) LongTensors [batch, longest], right-padded.

        Samples are grouped by length (longest first, ties in the seeded order)
        so that batches carry little padding: padded positions still pass
        through the linear layers and would otherwise skew activation ranges.
        Longest first also makes an out-of-memory batch size fail at once.
        """
        import torch

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        order = sorted(range(len(self.samples)), key=lambda i: -len(self.samples[i]))
        for start in range(0, len(order), batch_size):
            chunk = [self.samples[i] for i in order[start : start + batch_size]]
            width = max(len(sample) for sample in chunk)
            input_ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, sample in enumerate(chunk):
                input_ids[row, : len(sample)] = torch.tensor(sample, dtype=torch.long)
                attention_mask[row, : len(sample)] = 1
            yield input_ids, attention_mask

    def as_hf_dataset(self) -> Dataset:
        """`input_ids` + `attention_mask` columns, e.g. for llm-compressor's `oneshot`."""
        from datasets import Dataset

        return Dataset.from_dict(
            {"input_ids": self.samples, "attention_mask": [[1] * len(s) for s in self.samples]}
        )

    def summary_table(self) -> Table:
        table = Table(title="Calibration mix", title_justify="left")
        table.add_column("dataset", no_wrap=True)
        table.add_column("source", overflow="fold")
        table.add_column("formatter", no_wrap=True, min_width=len("chat_completion"))
        table.add_column("weight")
        for header in ("requested", "loaded", "kept", "used"):
            table.add_column(header, justify="right")
        for name, count in self.per_dataset.items():
            table.add_row(
                escape(name), escape(count.source), count.formatter, f"{count.weight:g}",
                str(count.requested), str(count.loaded), str(count.kept), str(count.used),
            )
        totals = [sum(getattr(c, f) for c in self.per_dataset.values()) for f in ("requested", "loaded", "kept", "used")]
        table.add_section()
        table.add_row("total", "", "", "", *(str(t) for t in totals), style="bold")
        s = self.settings
        table.caption = (
            f"{len(self)} samples / {self.num_tokens} tokens (target {s.max_samples}); "
            f"max_seq_len {s.max_seq_len}, min_token_length {s.min_token_length}, "
            f"oversample {s.oversample_ratio:g}, seed {s.seed}; "
            f"token ids sha256 {self.token_ids_sha256[:12]}…"
        )
        return table

    def print_summary(self, console: Console) -> None:
        console.print(self.summary_table())
