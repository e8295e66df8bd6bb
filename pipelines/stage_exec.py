"""Run one pipeline stage in a child process.

Each stage runs in its own process so that its peak memory is measured on
its own (``ru_maxrss``), a crash or kill cannot corrupt the runner's state,
and memory held by one stage's libraries is returned before the next starts.
The request and result travel as JSON files.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from foundation.atomic_output import atomic_output_dir
from foundation.disk_errors import disk_problem
from foundation.errors import UserError
from pipelines.stages import ADAPTER_MODULES, StageContext, adapter_for


def execute(request_path: Path) -> int:
    request = json.loads(request_path.read_text())
    result_path = Path(request["result_path"])
    context = StageContext(**request["context"])
    final_stage_dir = Path(context.stage_dir)
    # The module comes from the fixed table, never from the request file: anyone who can write into
    # <output_dir> could otherwise make the next run import code of their choosing.
    stage = request.get("stage")
    if stage not in ADAPTER_MODULES:
        raise UserError(str(request_path), f"unknown stage {stage!r}", f"one of: {', '.join(ADAPTER_MODULES)}")
    adapter = adapter_for(stage)
    started = time.perf_counter()
    try:
        with atomic_output_dir(final_stage_dir, overwrite=True) as work_dir:
            context.stage_dir = str(work_dir)
            settings = adapter.build_settings(request["settings"], context)
            outcome = adapter.run(settings, context)
        status, error = "complete", None
    except UserError as problem:
        status, error, outcome = "failed", str(problem), {}
    except Exception as failure:  # noqa: BLE001 - recorded in the manifest, then re-raised as exit code
        plain = disk_problem(failure)  # a full disk is said plainly, not as a safetensors traceback
        status, error, outcome = "failed", str(plain) if plain else traceback.format_exc(), {}
    outcome["status"] = status
    outcome["error"] = error
    outcome["seconds"] = round(time.perf_counter() - started, 2)
    outcome["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result_path.write_text(json.dumps(outcome, indent=2, default=str))
    return 0 if status == "complete" else 1


def stop_when_parent_dies(poll_seconds: float = 1.0) -> None:
    """A runner killed with SIGKILL cannot stop its stage: the orphan would go on writing the stage's
    temporary directory and the Optuna journal while the re-run the user starts does the same. Watch the
    parent and, once it is gone, interrupt the main thread like Ctrl-C: temporary output is removed and the
    trial in flight stays RUNNING in the journal, so the re-run resumes it alone. The signal goes to the
    main thread itself (so a blocking call returns at once) and is SIGUSR1, not SIGINT, which a shell may
    have set to be ignored in a background job."""
    parent = os.getppid()
    main_thread = threading.main_thread().ident
    assert main_thread is not None

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"the pipeline runner (pid {parent}) is gone")

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_seconds)
        signal.pthread_kill(main_thread, signal.SIGUSR1)

    signal.signal(signal.SIGUSR1, interrupt)
    threading.Thread(target=watch, name="stop-when-parent-dies", daemon=True).start()


def main(request_path: Path) -> int:
    """Ctrl-C reaches this process and the runner alike; the runner reports it (and records the stage as
    interrupted), so here it ends quietly with the shell's code for SIGINT instead of a library traceback."""
    stop_when_parent_dies()
    try:
        return execute(request_path)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
