"""Which lm-evaluation-harness tasks a run names, found before any model is loaded.

A task is a built-in lm-eval name, the name of a task YAML in a local folder
(the shipped ``datasets_yaml/lm_eval_tasks`` and every ``--include_path``), or
the path of a task YAML. Local YAMLs are handed to lm-eval as config dicts with
their relative ``data_files`` / ``dataset_path`` resolved against the YAML's own
folder (lm-eval and ``datasets`` would read them from the working directory),
so a shipped task works from any directory and from an installed package.
lm-eval's index of its ~14,000 built-in tasks takes 10-60 s to build: it is
built only when a name is not found locally.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from foundation.errors import UserError
from foundation.package_data import packaged

logger = logging.getLogger(__name__)
SHIPPED_TASKS = "datasets_yaml/lm_eval_tasks"


@dataclass
class TaskSelection:
    """What ``lm_eval.simple_evaluate`` is given: ``specs`` (names and config dicts) and a task manager."""

    specs: list[str | dict[str, Any]]
    folders: list[Path]
    builtin: bool  # whether lm-eval's own tasks had to be indexed
    sources: dict[str, str] = field(default_factory=dict)  # task -> the YAML it came from, or "lm-eval"

    def manager(self):
        return task_manager(tuple(str(folder) for folder in self.folders), self.builtin)


def shipped_task_folder() -> Path:
    return packaged(SHIPPED_TASKS)


def _load_yaml(path: Path) -> dict[str, Any]:
    from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval's own reader: !function tags and include:

    try:
        config = load_yaml(path, resolve_func=True)
    except Exception as error:  # noqa: BLE001 - YAML syntax, a missing include, a bad !function: all the user's file
        raise UserError(str(path), f"not a readable lm-eval task YAML: {error}",
                        "fix the file (see lm-eval's task guide: task, dataset_path, output_type, doc_to_text, ...)") from None
    return config


def _local_path(value: Any, folder: Path) -> Any:
    """A relative path that exists next to the YAML, made absolute; anything else (a Hub id, a glob) as it is."""
    if isinstance(value, str) and value and not Path(value).is_absolute() and "://" not in value:
        candidate = folder / value
        if candidate.exists():
            return str(candidate.resolve())
    return value


def _with_local_paths(config: dict[str, Any], folder: Path) -> dict[str, Any]:
    config = dict(config)
    if "dataset_path" in config:
        config["dataset_path"] = _local_path(config["dataset_path"], folder)
    kwargs = dict(config.get("dataset_kwargs") or {})
    files = kwargs.get("data_files")
    if isinstance(files, dict):
        kwargs["data_files"] = {split: ([_local_path(item, folder) for item in value] if isinstance(value, list)
                                        else _local_path(value, folder)) for split, value in files.items()}
    elif isinstance(files, list):
        kwargs["data_files"] = [_local_path(item, folder) for item in files]
    elif files is not None:
        kwargs["data_files"] = _local_path(files, folder)
    if "data_dir" in kwargs:
        kwargs["data_dir"] = _local_path(kwargs["data_dir"], folder)
    if kwargs:
        config["dataset_kwargs"] = kwargs
    return config


@lru_cache(maxsize=1)
def _tag_tolerant_loader():
    """A safe YAML loader that reads lm-eval's ``!function`` tags as None: enough to learn a file's task name."""
    import yaml

    class TagTolerantLoader(yaml.SafeLoader):
        pass

    TagTolerantLoader.add_multi_constructor("!", lambda loader, suffix, node: None)
    return TagTolerantLoader


def _local_tasks(folders: Sequence[Path]) -> tuple[dict[str, Path], set[str]]:
    """``task name -> YAML`` of every task YAML below the folders (later folders win, as in lm-eval), and the
    names of the groups defined there."""
    import yaml

    tasks: dict[str, Path] = {}
    groups: set[str] = set()
    for folder in folders:
        for path in sorted(folder.rglob("*.yaml")):
            try:
                config = yaml.load(path.read_text(encoding="utf-8"), Loader=_tag_tolerant_loader())  # noqa: S506
            except (yaml.YAMLError, OSError, UnicodeDecodeError):
                continue
            if isinstance(config, dict) and isinstance(config.get("group"), str):
                groups.add(config["group"])
            elif isinstance(config, dict) and isinstance(config.get("task"), str):
                tasks[config["task"]] = path
    return tasks, groups


@lru_cache(maxsize=2)
def task_manager(folders: tuple[str, ...], builtin: bool):
    """lm-eval's index of the local folders, and of its own ~14,000 tasks when ``builtin`` (the slow part)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(folders) or None, include_defaults=builtin)


def _unknown(name: str, candidates: Sequence[str], folders: Sequence[Path]) -> UserError:
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    where = ", ".join(str(folder) for folder in folders)
    return UserError("--tasks", f"unknown lm-eval task {name!r} (neither a built-in task nor a task YAML in {where})",
                     f"{hint}list the built-in ones with `lm_eval ls tasks`; a local task: give the path of its YAML, "
                     "or its folder with --include_path")


def select_tasks(names: Sequence[str], include_path: Sequence[Path] = ()) -> TaskSelection:
    """Resolve every name now (a typo fails before a model is loaded)."""
    folders = [shipped_task_folder()]
    for folder in include_path:
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise UserError("--include_path", f"{folder} is not a folder",
                            "give a folder that holds lm-eval task YAML files (searched recursively)")
        folders.append(folder.resolve())
    local, local_groups = _local_tasks(folders)
    specs: list[str | dict[str, Any]] = []
    sources: dict[str, str] = {}
    builtin_names: list[str] = []
    for name in names:
        if name.endswith((".yaml", ".yml")):
            path = Path(name).expanduser()
            if not path.is_file():
                raise UserError("--tasks", f"task file {path} does not exist", "give the path of an lm-eval task YAML")
            config = _load_yaml(path.resolve())
            if not isinstance(config.get("task"), str):
                raise UserError(str(path), "holds no 'task:' name (a group YAML is not supported as a path)",
                                "name the group instead, with its folder in --include_path")
            specs.append(_with_local_paths(config, path.resolve().parent))
            sources[config["task"]] = str(path.resolve())
        elif name in local:
            specs.append(_with_local_paths(_load_yaml(local[name]), local[name].parent))
            sources[name] = str(local[name])
        elif name in local_groups:  # lm-eval finds it through include_path (its members' paths as lm-eval reads them)
            specs.append(name)
            sources[name] = "local group"
        else:
            builtin_names.append(name)
    if builtin_names:
        import fnmatch

        known = task_manager(tuple(str(folder) for folder in folders), True).all_tasks
        for name in builtin_names:
            matches = fnmatch.filter(known, name) if any(char in name for char in "*?[") else [name] * (name in known)
            if not matches:
                raise _unknown(name, [*known, *local, *local_groups], folders)
            for match in matches:
                specs.append(match)
                sources[match] = "lm-eval"
    return TaskSelection(specs, folders, bool(builtin_names), sources)
