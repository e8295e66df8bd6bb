"""Measuring a benchmarked child process: GPU memory by pid, trial times from its Optuna journal, a deadline.

Shared by bench/stage2_gpu_vs_heretic.py and bench/stage2_70b_shaped.py, which run heretic and our CLI as
child processes on the GPU machine and must leave a partial result before the device's 600 s limit.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

OURS_RUNNER = r'''
"""Our CLI with torch's peak memory and the model load time reported at exit (by bench/stage2_gpu_vs_heretic.py)."""
import atexit, json, os, sys, time
import torch

_load_seconds = []

def _report():
    path = os.environ.get("BENCH_MEMORY_JSON")
    if path:
        report = {"load_seconds": _load_seconds}
        if torch.cuda.is_available():
            report.update(max_memory_allocated=torch.cuda.max_memory_allocated(),
                          max_memory_reserved=torch.cuda.max_memory_reserved())
        with open(path, "w") as f:
            json.dump(report, f)
atexit.register(_report)
try:  # time load_model (imported by abliterate.run as a name, so patch it before that import)
    import abliterate.loading as _loading
    _original = _loading.load_model
    def _timed_load(*args, **kwargs):
        started = time.time()
        try:
            return _original(*args, **kwargs)
        finally:
            _load_seconds.append(time.time() - started)
    _loading.load_model = _timed_load
except Exception as error:
    print(f"BENCH: cannot time load_model ({error!r})", flush=True)
from pipelines.cli import main
sys.exit(main(sys.argv[1:]))
'''


# ---------------------------------------------------------------- measuring a child process

class GpuMemoryPoller(threading.Thread):
    """Max GPU memory of one process (nvidia-smi every `interval` s): by its pid, over all compute apps, and
    device-wide used memory above the level before it started (pids inside containers may not match)."""

    def __init__(self, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.interval, self.pid = interval, None
        self.by_pid = self.all_apps = self.device_delta = 0
        self.available = shutil.which("nvidia-smi") is not None
        self.baseline = self._device_used() if self.available else 0
        self._halt = threading.Event()

    @staticmethod
    def _query(args: list[str]) -> list[list[str]]:
        try:
            text = subprocess.run(["nvidia-smi", *args, "--format=csv,noheader,nounits"], capture_output=True,
                                  text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return []
        return [[part.strip() for part in line.split(",")] for line in text.splitlines() if line.strip()]

    def _device_used(self) -> int:
        rows = self._query(["--query-gpu=memory.used"])
        return sum(int(row[0]) for row in rows if row and row[0].isdigit()) * 2**20

    def run(self) -> None:
        while self.available and not self._halt.is_set():
            pids = self._family()
            apps = [(int(row[0]), int(row[1]) * 2**20) for row in self._query(["--query-compute-apps=pid,used_memory"])
                    if len(row) == 2 and row[0].isdigit() and row[1].isdigit()]
            self.by_pid = max(self.by_pid, sum(used for pid, used in apps if pid in pids))
            self.all_apps = max(self.all_apps, sum(used for _, used in apps))
            self.device_delta = max(self.device_delta, self._device_used() - self.baseline)
            self._halt.wait(self.interval)

    def _family(self) -> set[int]:
        if self.pid is None:
            return set()
        try:
            import psutil

            return {self.pid, *(child.pid for child in psutil.Process(self.pid).children(recursive=True))}
        except Exception:
            return {self.pid}

    def stop(self) -> dict:
        self._halt.set()
        self.join(timeout=15)
        peak = self.by_pid or self.all_apps or self.device_delta
        source = "pid" if self.by_pid else "all compute apps" if self.all_apps else "device used - baseline"
        return {"peak_bytes": peak if self.available else None, "source": source if self.available else "no nvidia-smi",
                "by_pid": self.by_pid, "all_apps": self.all_apps, "device_used_minus_baseline": self.device_delta}


@dataclass
class ChildResult:
    returncode: int | None
    started: float
    wall_s: float
    log: Path
    memory: dict = field(default_factory=dict)
    torch_memory: dict | None = None
    timed_out: bool = False
    timeout_s: float | None = None
    rss: dict | None = None  # peak RSS (anonymous / file-backed) when asked for

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class RssPoller(threading.Thread):
    """Max RSS, anonymous and file-backed, of one process (/proc/PID/status every `interval` s)."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    key, _, value = line.partition(":")
                    if key in self.peak:
                        self.peak[key] = max(self.peak[key], int(value.split()[0]) * 1024)
            except (OSError, ValueError, IndexError):
                pass
            self._halt.wait(self.interval)

    def stop(self) -> dict:
        self._halt.set()
        self.join(timeout=5)
        return {f"peak_{key}_bytes": value for key, value in self.peak.items()}


DEADLINE = [float("inf")]  # time.time() by which every child must have ended (--budget_s)


def time_left(reserve: float = 20.0) -> float:
    return max(DEADLINE[0] - time.time() - reserve, 1.0)


def run_child(command: list[str], log: Path, env: dict, cwd: Path, timeout: float, *, reserve: float = 20.0,
              poll_rss: bool = False) -> ChildResult:
    """Run one tool as a child process, polling its GPU memory (and its RSS); never raises for the child's failure.

    The timeout is cut to what is left of the bench's budget minus ``reserve`` seconds, so the JSON is still
    written in time."""
    timeout = min(timeout, time_left(reserve))
    memory_json = log.with_suffix(".memory.json")
    memory_json.unlink(missing_ok=True)
    env = dict(env, BENCH_MEMORY_JSON=str(memory_json))
    poller = GpuMemoryPoller()
    poller.start()
    started = time.time()
    timed_out = False
    with open(log, "w") as handle:
        handle.write("$ " + " ".join(command) + "\n")
        handle.flush()
        process = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=handle,
                                   stderr=subprocess.STDOUT)
        poller.pid = process.pid
        rss = RssPoller(process.pid) if poll_rss else None
        if rss:
            rss.start()
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            returncode, timed_out = process.wait(), True
    wall = time.time() - started
    torch_memory = json.loads(memory_json.read_text()) if memory_json.is_file() else None
    return ChildResult(returncode, started, wall, log, poller.stop(), torch_memory, timed_out, timeout,
                       rss.stop() if rss else None)


def trial_times(journal: Path, started: float) -> dict:
    """Mean seconds per completed trial and seconds from `started` to the end of the first, from a journal."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(journal)))
    trials = []
    for summary in optuna.get_all_study_summaries(storage):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        trials += [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"
                   and t.datetime_start and t.datetime_complete]
    if not trials:
        return {"n_trials": 0, "seconds_per_trial": None, "seconds_to_first_trial": None}
    durations = [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials]
    first = min(t.datetime_complete for t in trials)
    return {"n_trials": len(trials), "seconds_per_trial": sum(durations) / len(durations),
            "trial_seconds": durations, "seconds_to_first_trial": first.timestamp() - started}


def summarize(result: ChildResult, journal: Path | None) -> dict:
    times = trial_times(journal, result.started) if journal and journal.is_file() else {
        "n_trials": 0, "seconds_per_trial": None, "seconds_to_first_trial": None}
    ok = times["n_trials"] > 0
    return {"ok": ok, "returncode": result.returncode, "timed_out": result.timed_out, "wall_s": result.wall_s,
            "peak_gpu_bytes": result.memory.get("peak_bytes"), "gpu_memory_poll": result.memory,
            "torch_memory": result.torch_memory, **times, "journal": str(journal) if journal else None,
            "log": str(result.log), "error_tail": None if ok and result.returncode == 0 else result.tail()}


# ---------------------------------------------------------------- the model and its checkpoint

def ratio(a, b):
    return a / b if a is not None and b else None


def versions() -> dict:
    import importlib.metadata as md

    names = ("torch", "transformers", "nvidia-modelopt", "optuna", "peft", "accelerate", "safetensors", "triton")
    found = {"python": platform.python_version()}
    for name in names:
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = None
    return found


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or 'x86_64'})"


