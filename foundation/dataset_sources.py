"""Where a dataset's rows come from: the Hub, a `save_to_disk` folder, a
folder of data files, or one local json / jsonl / parquet / csv / txt file.

Stage 1's calibration mixes and stage 2's prompt sets both name their data
this way and open it here, so both accept the same sources and report the same
errors. Everything is opened through the `datasets` library so that Hub ids,
local files and streaming behave the same way; this module only decides which
of its loaders to call, applies split slices (``train[:400]``, also to
`save_to_disk` folders) and draws a seeded random subset of rows.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from foundation.errors import UserError
from foundation.hub_ids import looks_like_local_path

if TYPE_CHECKING:
    from datasets import Dataset, IterableDataset


class DatasetRequest(Protocol):
    """What opening a dataset needs: a mix entry (``schema.DatasetEntry``) or a prompt set provides it."""

    path: str
    subset: str | None
    split: str  # a split name, or the `datasets` slice syntax: train[:400], test[10:20], train[:50%]
    streaming: bool
    revision: str | None  # Hub only: a commit sha, tag or branch

# File suffix -> the `datasets` packaged builder that reads it.
LOCAL_FILE_BUILDERS: dict[str, str] = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": "text",
}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?")
# Streaming datasets are shuffled through a buffer; bigger = more random, slower start.
_MAX_STREAM_BUFFER = 10_000

SourceKind = Literal["hub", "file", "saved", "folder"]


class SourceProblem(Exception):
    """A path that is neither an existing local dataset nor a valid Hub id."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.fix = fix


@dataclass(frozen=True)
class DatasetSource:
    kind: SourceKind
    location: str  # a Hub id, or an absolute local path


def resolve_source(raw: str, base_dir: Path) -> DatasetSource:
    """Classify `raw` (as written in the YAML); relative paths are taken from `base_dir`."""
    expanded = Path(raw).expanduser()
    candidate = expanded if expanded.is_absolute() else base_dir / expanded
    if candidate.is_file():
        builder = LOCAL_FILE_BUILDERS.get(candidate.suffix.lower())
        if builder is None:
            raise SourceProblem(
                f"unsupported file type {candidate.suffix!r} ({candidate})",
                f"convert it to one of {', '.join(LOCAL_FILE_BUILDERS)} or save it with "
                "Dataset.save_to_disk and point path at that folder",
            )
        return DatasetSource("file", str(candidate.resolve()))
    if candidate.is_dir():
        saved = (candidate / "dataset_dict.json").is_file() or (candidate / "state.json").is_file()
        return DatasetSource("saved" if saved else "folder", str(candidate.resolve()))
    if _looks_local(raw):
        raise SourceProblem(
            f"file not found: {candidate}",
            "correct the path (relative paths are resolved against the YAML file's folder) "
            "or use a Hugging Face Hub id such as HuggingFaceH4/ultrachat_200k",
        )
    if not _HUB_ID.fullmatch(raw):
        raise SourceProblem(
            f"{raw!r} is neither an existing local path nor a Hub dataset id",
            "use an id like 'owner/name', or a path to a save_to_disk folder or a "
            f"{'/'.join(LOCAL_FILE_BUILDERS)} file",
        )
    return DatasetSource("hub", raw)


def _looks_local(raw: str) -> bool:
    """A path by the shared rule, or a data file name (``chat.jsonl``), which is never a dataset id."""
    return looks_like_local_path(raw) or Path(raw).suffix.lower() in LOCAL_FILE_BUILDERS


def open_dataset(entry: DatasetRequest, where: str) -> Dataset | IterableDataset:
    """Open one entry's split (streamed when asked); failures become `UserError`."""
    import datasets

    source = resolve_source(entry.path, Path.cwd())
    if entry.subset is not None and source.kind != "hub":
        raise UserError(
            f"{where}, field 'subset'",
            f"subset applies to Hub datasets only, but {source.location} is local",
            "remove 'subset' (or point path at the Hub id)",
        )
    if entry.revision is not None and source.kind != "hub":
        raise UserError(
            f"{where}, field 'revision'",
            f"revision applies to Hub datasets only, but {source.location} is local",
            "remove 'revision' (or point path at the Hub id)",
        )
    try:
        if source.kind == "saved":
            return _open_saved(source.location, entry, where)
        if source.kind == "file":
            builder = LOCAL_FILE_BUILDERS[Path(source.location).suffix.lower()]
            extra = {"sample_by": "paragraph"} if builder == "text" else {}
            split_name = entry.split.split("[", 1)[0]
            return datasets.load_dataset(
                builder,
                data_files={split_name: source.location},
                split=entry.split,
                streaming=entry.streaming,
                **extra,
            )
        return datasets.load_dataset(
            source.location, name=entry.subset, split=entry.split, streaming=entry.streaming,
            **({"revision": entry.revision} if entry.revision is not None else {}),
        )
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 - the library raises many kinds; all mean "cannot load"
        hub_fix = (
            "check the id, subset and split on huggingface.co, log in (HF_TOKEN) for gated "
            "datasets, check the network, or download it and point path at a local copy"
        )
        raise UserError(
            f"{where}, field 'path'",
            f"could not load {source.location!r} (split {entry.split!r}): "
            f"{type(error).__name__}: {error}",
            hub_fix if source.kind == "hub" else "check that the file is valid and the split exists",
        ) from error


def _open_saved(location: str, entry: DatasetRequest, where: str) -> Dataset | IterableDataset:
    import datasets

    loaded = datasets.load_from_disk(location)
    if _is_sliced(entry.split):
        loaded = _slice_saved(loaded, entry.split, location, where)
    elif isinstance(loaded, datasets.DatasetDict):
        if entry.split not in loaded:
            raise UserError(
                f"{where}, field 'split'",
                f"split {entry.split!r} not in the saved dataset at {location}",
                f"use one of: {', '.join(loaded)}",
            )
        loaded = loaded[entry.split]
    return loaded.to_iterable_dataset() if entry.streaming else loaded


def _is_sliced(split: str) -> bool:
    return "[" in split or "+" in split


def _slice_saved(loaded: Any, split: str, location: str, where: str) -> Dataset:
    """``train[:400]`` (the `datasets` split syntax) applied to a saved dataset, as ``load_dataset`` applies it.

    A saved DatasetDict is sliced by split name; a single saved Dataset has no split names, so any name
    addresses the whole of it and only the slice applies.
    """
    import datasets

    try:
        instruction = datasets.ReadInstruction.from_spec(split)
    except (ValueError, AssertionError) as error:
        raise UserError(f"{where}, field 'split'", f"cannot read split {split!r} ({error})",
                        "write a split name with an optional slice, e.g. train, train[:400], test[10:20], train[:50%]") from None
    names = [part.split("[", 1)[0].strip() for part in split.split("+")]
    is_dict = isinstance(loaded, datasets.DatasetDict)
    sizes = {name: len(loaded[name]) if is_dict and name in loaded else len(loaded) for name in names}
    missing = [name for name in names if is_dict and name not in loaded]
    if missing:
        raise UserError(f"{where}, field 'split'", f"split {missing[0]!r} not in the saved dataset at {location}",
                        f"use one of: {', '.join(loaded)}")
    try:
        pieces = [(loaded[part.splitname] if is_dict else loaded).select(range(part.from_, part.to) if part.to > part.from_ else [])
                  for part in instruction.to_absolute(sizes)]
    except (ValueError, AssertionError, IndexError) as error:
        raise UserError(f"{where}, field 'split'", f"cannot apply split {split!r} to {location} ({error})",
                        f"sizes there: {', '.join(f'{name}: {size} rows' for name, size in sizes.items())}") from None
    return pieces[0] if len(pieces) == 1 else datasets.concatenate_datasets(pieces)


def column_names(dataset: Dataset | IterableDataset) -> list[str]:
    """Column names, peeking at the first row when a stream does not declare them."""
    names = dataset.column_names
    if names is None:
        first = next(iter(dataset), None)
        names = list(first) if first else []
    return list(names)


def take_rows(dataset: Dataset | IterableDataset, count: int, seed: int) -> list[dict[str, Any]]:
    """A seeded random subset of `count` rows (all rows, shuffled, if there are fewer).

    A map-style dataset is sampled uniformly without replacement; a stream is
    shuffled through a bounded buffer and only `count` rows are read from it.
    """
    import datasets

    if count <= 0:
        return []
    if isinstance(dataset, datasets.IterableDataset):
        buffer = min(_MAX_STREAM_BUFFER, max(1_000, 4 * count))
        return list(dataset.shuffle(seed=seed, buffer_size=buffer).take(count))
    indices = random.Random(seed).sample(range(len(dataset)), min(count, len(dataset)))
    return dataset.select(indices).to_list()
