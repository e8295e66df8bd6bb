"""``--workers N``: this process and N - 1 more search one shared study, each pinned to one GPU.

The others are started first, as ``python -m abliterate.worker_main`` reading this run's settings (as JSON, on
stdin: a database password never shows in ``ps``) with ``--search_only`` and ``--workers 1``; each logs to
``<study_dir>/worker-<i>.log``. Then this process pins itself to the first GPU (CUDA_VISIBLE_DEVICES is
read when CUDA initializes, which has not happened yet) and runs as the first worker: it takes trials until
the study is complete, then selects and writes the output. A worker that dies costs only its running trial,
which a living one retries; the others' exit statuses are reported at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from abliterate.search.storage import StorageSpec
from abliterate.settings import AbliterateSettings
from foundation.errors import UserError

CHILD_GRACE_SECONDS = 15  # once the study is complete, how long the others may take to exit


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries; counted without initializing CUDA."""
    import torch

    count = torch.cuda.device_count()  # NVML: does not initialize CUDA, honours CUDA_VISIBLE_DEVICES
    if count <= 0:
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [entry.strip() for entry in listed.split(",") if entry.strip()][:count]
    return [str(index) for index in range(count)]


def shared_settings(settings: AbliterateSettings) -> AbliterateSettings:
    """The run's settings with a shared storage: --storage as given, else the journal in --study_dir."""
    storage = settings.storage or str(StorageSpec(journal=settings.study_path() / "journal.log").describe())
    return settings.model_copy(update={"storage": storage, "workers": 1})


def start_worker(index: int, settings: AbliterateSettings, gpu: str | None, log: Path) -> subprocess.Popen:
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as handle:
        process = subprocess.Popen([sys.executable, "-m", "abliterate.worker_main"], stdin=subprocess.PIPE, stdout=handle,
                                   stderr=subprocess.STDOUT, env=env)
    worker = settings.model_copy(update={"search_only": True})
    process.stdin.write(worker.model_dump_json().encode())
    process.stdin.close()
    return process


def run_with_workers(settings: AbliterateSettings, console: Console, settings_sources: dict[str, str] | None,
                     run_abliteration: Callable[..., Path | None], check_output_paths: Callable[[AbliterateSettings], None]
                     ) -> Path | None:
    """``run_abliteration`` / ``check_output_paths``: abliterate.run's (passed in: run imports this module)."""
    shared = shared_settings(settings)
    if not shared.search_only:
        check_output_paths(shared)  # before any worker starts
    gpus = visible_gpus()
    if gpus and settings.workers > len(gpus):
        console.print(f"[yellow]note:[/] --workers {settings.workers} on {len(gpus)} GPU(s): workers share GPUs "
                      "round robin (each holds its own copy of the model)")
    processes = []
    try:
        for index in range(1, settings.workers):
            gpu = gpus[index % len(gpus)] if gpus else None
            log = shared.study_path() / f"worker-{index}.log"
            processes.append((index, start_worker(index, shared, gpu, log), log))
            console.print(f"worker {index}: pid {processes[-1][1].pid}" + (f", GPU {gpu}" if gpu else "")
                          + f", log {log}", highlight=False)
        if gpus:
            import torch

            if torch.cuda.is_initialized():
                raise UserError("--workers", "CUDA was initialized before the workers were pinned to their GPUs",
                                "run --workers from the command line (quant-abliterate abliterate ...), not after "
                                "other GPU work in the same Python process")
            os.environ["CUDA_VISIBLE_DEVICES"] = gpus[0]
        console.print(f"worker 0: this process (pid {os.getpid()})" + (f", GPU {gpus[0]}" if gpus else ""),
                      highlight=False)
        result = run_abliteration(shared, console, settings_sources)
    except BaseException:
        for _, process, _ in processes:
            process.terminate()  # their running trials are retried by the next run of this command
        raise
    # every trial is complete now (unless this process is --search_only too: then the others run on until none is
    # left): a worker still alive is exiting, or still loading and would find nothing to do
    grace = None if shared.search_only else CHILD_GRACE_SECONDS
    for index, process, log in processes:
        try:
            code = process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.terminate()
            process.wait()
            console.print(f"worker {index} stopped: no trial was left for it", highlight=False)
            continue
        if code != 0:
            console.print(f"[yellow]worker {index} exited with status {code}[/] (its trials, if any, were retried by "
                          f"the others); see {log}", highlight=False)
    return result
