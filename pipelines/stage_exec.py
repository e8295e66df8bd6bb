"""Run one pipeline stage in a child process.

Each stage runs in its own process so that its peak memory is measured on
its own (``ru_maxrss``), a crash or kill cannot corrupt the runner's state,
and memory held by one stage's libraries is returned before the next starts.
The request and result travel as JSON files.
"""

from __future__ import annotations

import importlib
import json
import resource
import sys
import time
import traceback
from pathlib import Path

from pipelines.stages import StageContext
from quantize.atomic_output import atomic_output_dir
from quantize.errors import UserError


def execute(request_path: Path) -> int:
    request = json.loads(request_path.read_text())
    result_path = Path(request["result_path"])
    context = StageContext(**request["context"])
    final_stage_dir = Path(context.stage_dir)
    adapter = importlib.import_module(request["adapter"])
    started = time.perf_counter()
    try:
        with atomic_output_dir(final_stage_dir, overwrite=True) as work_dir:
            context.stage_dir = str(work_dir)
            settings = adapter.build_settings(request["settings"], context)
            outcome = adapter.run(settings, context)
        status, error = "complete", None
    except UserError as problem:
        status, error, outcome = "failed", str(problem), {}
    except Exception:  # noqa: BLE001 - recorded in the manifest, then re-raised as exit code
        status, error, outcome = "failed", traceback.format_exc(), {}
    outcome["status"] = status
    outcome["error"] = error
    outcome["seconds"] = round(time.perf_counter() - started, 2)
    outcome["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result_path.write_text(json.dumps(outcome, indent=2, default=str))
    return 0 if status == "complete" else 1


if __name__ == "__main__":
    sys.exit(execute(Path(sys.argv[1])))
