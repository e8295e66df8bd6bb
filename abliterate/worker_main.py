"""A worker started by ``--workers`` (``abliterate.workers``): its settings arrive as JSON on stdin."""

from __future__ import annotations

import json
import os
import sys

from rich.console import Console

from abliterate.run import run_abliteration
from abliterate.settings import AbliterateSettings
from foundation.guarded_cli import run_guarded


def main(_: list[str]) -> int:
    settings = AbliterateSettings.from_mapping(json.loads(sys.stdin.read()))
    console = Console(width=200)
    console.print(f"worker pid {os.getpid()}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}",
                  highlight=False)
    run_abliteration(settings, console)
    return 0


if __name__ == "__main__":
    sys.exit(run_guarded(main, []))
