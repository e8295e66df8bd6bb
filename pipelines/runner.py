"""``quant-abliterate run PIPELINE.yaml``: run the stages in order, resumably.

Every stage writes ``<output_dir>/<stage>/`` (atomically) and a record in
``<output_dir>/manifest.json``. Re-running the same command skips stages whose
settings and inputs are unchanged, redoes a stage that failed or was killed,
and ``--from STAGE`` forces that stage and everything after it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from foundation.atomic_output import check_can_write_in
from foundation.errors import UserError
from foundation.output_guard import check_output_location
from foundation.output_lock import output_lock
from pipelines.manifest import (
    MANIFEST_NAME,
    Manifest,
    combined_hash,
    command_line,
    directory_hashes,
    file_sha256,
    fingerprint,
    library_versions,
    settings_used,
)
from pipelines.report import print_final_table
from pipelines.spec import STAGE_ORDER, PipelineSpec, load_pipeline
from pipelines.stages import StageContext, adapter_for, artifact_dir

console = Console()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="quant-abliterate run", description=__doc__)
    parser.add_argument("pipeline", help="pipeline YAML, e.g. pipelines/testbed_default.yaml")
    parser.add_argument("--from", dest="from_stage", choices=STAGE_ORDER, help="redo this stage and all after it")
    parser.add_argument("--output_dir", help="override the YAML's output_dir")
    parser.add_argument("--overwrite", action="store_true", help="replace an output_dir that holds no pipeline manifest")
    parser.add_argument("--set", action="append", default=[], metavar="STAGE.KEY=VALUE",
                        help="override one stage setting (YAML value syntax), e.g. --set abliterate.n_trials=8")
    return parser.parse_args(argv)


def apply_overrides(spec: PipelineSpec, overrides: list[str]) -> None:
    import yaml

    stages = {stage.name: stage for stage in spec.stages}
    for item in overrides:
        key, sep, raw_value = item.partition("=")
        stage_name, dot, setting = key.partition(".")
        if not sep or not dot or not setting:
            raise UserError(f"--set {item}", "expected STAGE.KEY=VALUE", "e.g. --set abliterate.n_trials=8")
        if stage_name not in stages:
            raise UserError(f"--set {item}", f"stage '{stage_name}' is not in this pipeline", f"use one of: {', '.join(stages)}")
        try:
            stages[stage_name].settings[setting] = yaml.safe_load(raw_value)
        except yaml.YAMLError as error:
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            tag = " (YAML tags such as !!python/... are blocked: values are read with yaml.safe_load)" if "tag" in problem else ""
            raise UserError(f"--set {item}", f"the value is not plain YAML: {problem}{tag}",
                            "write a plain value (a number, true/false, a string, [a, b]); quote a string that "
                            "starts with ! & * or holds ': '") from None


def check_output_dir(output_dir: Path, spec: PipelineSpec, pipeline_file: str) -> None:
    """--overwrite deletes an output_dir without a manifest: it must not be (or hold, or lie in) the model or the YAML."""
    check_output_location(output_dir, {"model": spec.model, "pipeline file": pipeline_file},
                          output_flag="output_dir (--output_dir or the YAML's)")


def prepare_output_dir(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(str(output_dir), "output_dir is an existing file, not a directory",
                        "pass another --output_dir (a directory to create, or a previous pipeline output)")
    check_can_write_in(output_dir)  # a file or a read-only folder above it: say so now, not as NotADirectoryError
    if output_dir.exists() and not (output_dir / MANIFEST_NAME).is_file() and any(output_dir.iterdir()):
        if not overwrite:
            raise UserError(str(output_dir), "exists and is not a pipeline output (no manifest.json)",
                            "choose another output_dir, or pass --overwrite to replace it")
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)


def source_hash(model: str) -> tuple[str, dict[str, str]]:
    path = Path(model)
    if path.is_dir():
        hashes = directory_hashes(path)
        return combined_hash(hashes), hashes
    return f"hub:{model}", {}


def run_stage_process(stage: str, settings: dict[str, Any], context: StageContext, work: Path) -> dict[str, Any]:
    request_path = work / f".{stage}-request.json"
    result_path = work / f".{stage}-result.json"
    result_path.unlink(missing_ok=True)
    request_path.write_text(json.dumps({
        "stage": stage, "settings": settings, "result_path": str(result_path), "context": context.__dict__,
    }, default=str))
    process = subprocess.run([sys.executable, "-m", "pipelines.stage_exec", str(request_path)], check=False)
    if not result_path.is_file():
        return {"status": "failed", "error": f"the stage process exited with code {process.returncode} before reporting"}
    return json.loads(result_path.read_text())


def run_stage_with_interrupt_record(manifest: Manifest, record: dict[str, Any], stage: str, settings: dict[str, Any],
                                    context: StageContext, work: Path) -> dict[str, Any]:
    """Ctrl-C reaches the runner too: record the stage as ``interrupted`` (not a stale ``running``) before
    re-raising, so manifest.json tells a killed run from one still in progress; the re-run redoes it either way."""
    try:
        return run_stage_process(stage, settings, context, work)
    except KeyboardInterrupt:
        record.update(status="interrupted", error="interrupted (Ctrl-C); re-run the same command to resume")
        manifest.save()
        raise


def validate_all(spec: PipelineSpec, output_dir: Path) -> None:
    """Build every stage's settings before running anything: errors come first."""
    previous = None
    for stage in spec.stages:
        context = StageContext(spec.name, spec.model, previous, str(output_dir / stage.name), spec.trust_remote_code,
                               spec.evaluate_original)
        adapter_for(stage.name).build_settings(dict(stage.settings), context)
        previous = str(output_dir / stage.name)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    spec = load_pipeline(args.pipeline)
    apply_overrides(spec, args.set)
    output_dir = Path(args.output_dir or spec.output_dir).absolute()
    check_output_dir(output_dir, spec, args.pipeline)
    validate_all(spec, output_dir)
    # One run per output_dir: a second one is refused (naming this one) before it touches anything.
    with output_lock(output_dir, what="pipeline output_dir"):
        prepare_output_dir(output_dir, args.overwrite)
        return run_stages(args, spec, output_dir)


def run_stages(args: argparse.Namespace, spec: PipelineSpec, output_dir: Path) -> int:
    manifest = Manifest.open(output_dir)
    input_hash, model_hashes = source_hash(spec.model)
    manifest.data.update({
        "pipeline": {"name": spec.name, "file": str(Path(args.pipeline).absolute()), "sha256": file_sha256(Path(args.pipeline))},
        "source_model": {"model": spec.model, "sha256": input_hash, "files": model_hashes},
        "versions": library_versions(),
        "command": command_line(),
    })
    manifest.save()

    forced = False
    previous_dir: str | None = None
    previous_results: dict[str, dict[str, Any]] = {}
    for stage in spec.stages:
        forced = forced or stage.name == args.from_stage
        stage_dir = output_dir / stage.name
        context = StageContext(spec.name, spec.model, previous_dir, str(stage_dir), spec.trust_remote_code,
                               spec.evaluate_original, previous_results)
        # The settings the stage will run with (YAML block + wired values + defaults), not the block alone:
        # a changed default or wired value must not be reported 'up to date'.
        used = settings_used(adapter_for(stage.name).build_settings(dict(stage.settings), context), output_dir)
        stage_fingerprint = fingerprint(stage.name, used, input_hash)
        record = manifest.stages.get(stage.name, {})
        if not forced and manifest.is_complete(stage.name, stage_fingerprint, stage_dir):
            console.print(f"[green]✓ {stage.name}[/]: up to date (inputs and settings unchanged), skipped")
        else:
            console.rule(f"[bold]stage: {stage.name}")
            record = {"status": "running", "fingerprint": stage_fingerprint, "settings": used,
                      "settings_given": stage.settings, "input_sha256": input_hash,
                      "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            manifest.stages[stage.name] = record
            manifest.save()
            record.update(run_stage_with_interrupt_record(manifest, record, stage.name, stage.settings, context, output_dir))
            if record["status"] == "complete":
                record["outputs"] = directory_hashes(stage_dir)
                record["output_sha256"] = combined_hash(record["outputs"])
            manifest.save()
            if record["status"] != "complete":
                console.print(f"[bold red]stage {stage.name} failed[/]:\n{record.get('error')}", highlight=False)
                console.print(f"re-run the same command to retry it; completed stages are kept ({manifest.path})")
                return 1
        previous_results[stage.name] = {k: v for k, v in record.items() if k != "outputs"}
        previous_dir = str(artifact_dir(output_dir, stage.name, record))
        input_hash = record["output_sha256"]

    print_final_table(console, manifest.data)
    console.print(f"manifest: {manifest.path}")
    return 0
