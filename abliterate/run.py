"""The abliterate stage from settings to output directory: runs the search; the edge where I/O and printing live.

What the search is measured with (prompt sets, evaluation config, the study's
name) is built by modules of their own (``abliterate.prompts``,
``abliterate.evaluation_inputs``, ``abliterate.search.naming``), because the
export's verification and the pipeline rebuild the same evaluation without
running a search.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.prompt import IntPrompt
from safetensors.torch import load_file

from abliterate.architectures import discover
from abliterate.architectures.report import print_architecture
from abliterate.artifacts import write_chosen_trial
from abliterate.direction_store import compute_directions, load_or_compute_directions
from abliterate.edits.lora import LoraAbliterator
from abliterate.edits.plan import AbliterationParameters, edit_directions, plan_edits
from abliterate.evaluation import Evaluator, static_decode
from abliterate.evaluation.evaluator import SKILL_MAX_NEW_TOKENS, release_free_device_memory
from abliterate.evaluation.judge import check_judge_source
from abliterate.evaluation_inputs import (
    EvaluationInputs,
    evaluation_config,
    refusal_judge_of,
)
from abliterate.loading import load_model
from abliterate.prompt_lengths import context_length, prompt_files, require_prompts_fit
from abliterate.prompts import prompt_sets_of
from abliterate.search.journal import no_space_left
from abliterate.search.model_identity import open_study_of_model
from abliterate.search.naming import study_name
from abliterate.search.objectives import (
    TrialMetrics,
    broken_answers,
    zero_base_refusals_note,
)
from abliterate.search.selection import (
    DEFAULT_RULE,
    Candidate,
    collateral_text,
    effective_refusals,
    false_refusals_text,
    front_table,
    pareto_front,
    plot_front,
    select_trial,
)
from abliterate.search.regimes import (
    GENTLE,
    PRODUCT,
    gentle_study_name,
    regime_record,
    run_mixed_trials,
    search_number,
    split_trials,
    trial_regime,
)
from abliterate.search.shared_run import SharedSearch
from abliterate.search.shared_study import stored_directions
from abliterate.search.space import suggest_parameters
from abliterate.search.storage import parse_storage
from abliterate.search.study import (
    TrialOutcome,
    completed_trials,
    run_trials,
    trial_metrics,
    trial_parameters,
)
from abliterate.settings import AbliterateSettings
from abliterate.workers import run_with_workers
from foundation.atomic_output import (
    atomic_output_dir,
    check_writable_output,
)
from foundation.model_fingerprint import model_fingerprint
from foundation.output_guard import check_output_location
from foundation.output_lock import output_lock

SVD_SEED = 0


def describe_parameters(parameters: AbliterationParameters) -> str:
    scope = f"global@{parameters.direction_index:.2f}" if parameters.direction_index is not None else "per-layer"
    kernels = " ".join(
        f"{group}(max {k.max_weight:.2f}@{k.max_weight_position:.1f} min {k.min_weight:.2f} d {k.min_weight_distance:.1f})"
        for group, k in sorted(parameters.kernels.items())
    )
    return f"{scope} {kernels}"


def describe_metrics(metrics: TrialMetrics) -> str:
    n = metrics.n_harmful
    compliance = "-" if metrics.compliance is None else f"{metrics.compliance}/{n}"
    broken = broken_answers(metrics)
    markers = "" if metrics.marker_refusals is None else f" (judge; markers {metrics.marker_refusals}/{n})"
    return (f"refusals {metrics.refusals}/{n}{markers} compliance {compliance} fragments {'-' if broken is None else broken} "
            f"false refusals {false_refusals_text(metrics)}{collateral_text(metrics)} "
            f"KL {metrics.kl:.4f} (1st token {metrics.kl_first_token:.1e})")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def candidates_of(study, base: TrialMetrics, gentle=None) -> list[Candidate]:
    """The completed trials of the search (with a mixed search's ``gentle`` study: of both), by search number."""
    result = []
    mixed = gentle is not None
    for one in (study, gentle) if mixed else (study,):
        for trial in completed_trials(one):
            metrics, parameters = trial_metrics(trial), trial_parameters(trial)
            result.append(Candidate(search_number(trial), metrics, effective_refusals(metrics, base),
                                    parameters.direction_scope, parameters.direction_index,
                                    trial_regime(trial) if mixed else None))
    return result


def gentle_direction_settings(settings: AbliterateSettings) -> AbliterateSettings:
    """The gentle regime's direction recipe: the single mean-difference direction, projected against the harmless mean."""
    return settings.model_copy(update={"directions": "mean_difference", "direction_projected": True})


def choose(settings: AbliterateSettings, candidates: list[Candidate], front: list[Candidate], n_harmful: int,
           console: Console, n_harmless: int = 0, base: TrialMetrics | None = None) -> tuple[Candidate, str]:
    if settings.select is not None:
        return select_trial(settings.select, candidates, n_harmful, n_harmless, base=base)
    suggested, reason = select_trial(DEFAULT_RULE, candidates, n_harmful, n_harmless, base=base)
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        return suggested, f"{reason} (default rule '{DEFAULT_RULE}'; pass --select to choose)"
    numbers = [str(c.number) for c in candidates]
    number = IntPrompt.ask(f"trial to save (suggested: {reason})", choices=numbers, default=suggested.number,
                           console=console, show_choices=False)
    return next(c for c in candidates if c.number == number), "chosen interactively"


def check_output_paths(settings: AbliterateSettings) -> None:
    """--overwrite deletes the output: it must not be (or hold, or lie inside) the model, a prompt file or the study."""
    storage = parse_storage(settings.storage).local_file() if settings.storage else None
    inputs = {"--model": settings.model, "--prompts": settings.prompt_spec(), "--study_dir": settings.study_path(),
              "--judge": settings.judge, "--storage": storage,
              **{f"--{name}": getattr(settings, name) for name in ("harmful_train", "harmless_train", "harmful_test",
                                                                   "harmless_test")}}
    check_output_location(settings.output_dir(), inputs, output_flag="--out")
    check_writable_output(settings.output_dir(), settings.overwrite)


def run_abliteration(settings: AbliterateSettings, console: Console,
                     settings_sources: dict[str, str] | None = None) -> Path | None:
    """Search and write the chosen trial; the output and the study are locked for the whole run (one writer each).

    A shared study (``--storage``) has many writers by design: only the output is locked, and a
    ``--search_only`` worker writes none (it returns None). ``--workers N`` starts the other workers first.
    """
    if settings.workers > 1:
        return run_with_workers(settings, console, settings_sources, run_abliteration, check_output_paths)
    if settings.search_only:
        return _abliterate(settings, console, settings_sources)
    check_output_paths(settings)
    with contextlib.ExitStack() as locks:
        locks.enter_context(output_lock(settings.output_dir()))
        if settings.storage is None:
            locks.enter_context(output_lock(settings.study_path(), what="study"))
        return _abliterate(settings, console, settings_sources)


def _abliterate(settings: AbliterateSettings, console: Console, settings_sources: dict[str, str] | None) -> Path | None:
    out = settings.output_dir()
    if settings.cpu_threads:
        torch.set_num_threads(settings.cpu_threads)
    inputs = EvaluationInputs.from_settings(settings)
    prompts = prompt_sets_of(inputs)
    if settings.judge:  # a mistyped --judge must fail before the model loads, not after
        check_judge_source(settings.judge)
    console.print(f"prompts: {len(prompts.harmful_train)}+{len(prompts.harmless_train)} train, "
                  f"{len(prompts.harmful_test)}+{len(prompts.harmless_test)} test (harmful+harmless)")
    loaded = load_model(settings.model, dtypes=settings.dtypes, device_map=settings.device_map,
                        max_memory=settings.max_memory, trust_remote_code=settings.trust_remote_code,
                        offload_folder=settings.offload_folder, quantization=settings.quantization_request(), load_as=settings.load_as,
                        sibling_fusion=settings.sibling_fusion)
    model, tokenizer = loaded.model, loaded.tokenizer
    fused = f", {loaded.fused_groups} q/k/v and gate/up groups in one matmul each" if loaded.fused_groups else ""
    console.print(f"model: {settings.model} ({loaded.source_format}, dtype {loaded.dtype}, held {loaded.held_as}{fused}, "
                  f"resident {loaded.resident_bytes / 2**30:.2f} GiB)")
    architecture = discover(model)
    print_architecture(architecture, console)

    config = evaluation_config(inputs, prompts)
    judge = refusal_judge_of(inputs, model)
    if judge is not None:
        console.print(f"judge: {judge.description}; harmful answers without a refusal marker are generated to "
                      f"{config.harmful_window(True)} tokens and judged")
    require_prompts_fit(  # a prompt past the context is only a transformers warning, and garbage answers
        {"harmful_train": prompts.harmful_train, "harmless_train": prompts.harmless_train,
         "harmful_test": prompts.harmful_test, "harmless_test": prompts.harmless_test,
         **({"lookalike_test": prompts.lookalike_test} if prompts.lookalike_test else {}),
         **({"skill_test": prompts.skill_test} if prompts.skill_test else {})},
        {"harmful_test": config.harmful_window(judge is not None), "harmless_test": max(config.kl_tokens, config.max_new_tokens
                                                                     if config.count_harmless_refusals else 0),
         "lookalike_test": config.false_refusal_window, "skill_test": SKILL_MAX_NEW_TOKENS},
        prompt_files(inputs), tokenizer, context_length(model.config, tokenizer), config.system_prompt)
    evaluator = Evaluator(model, tokenizer, prompts.harmful_test, prompts.harmless_test, config, refusal_judge=judge,
                          **prompts.collateral_sets())
    base = TrialMetrics.from_eval_result(evaluator.base)
    # the adapters injected below replace modules, so the base evaluation's decoders cannot serve a trial
    # (static_decode.modules_key); dropped now, their KV caches do not stand beside the residual passes either
    static_decode.forget_decoders(model)
    judged = f", judge {evaluator.base.judge_seconds:.1f}s of it" if judge is not None else ""
    console.print(f"unedited model: {describe_metrics(base)} ({base.seconds:.1f}s{judged}, batch size {evaluator.batch_size})")
    note = zero_base_refusals_note(base)
    if note:
        console.print(f"[yellow]note:[/] {note}")
    if base.compliance is None:
        console.print("[yellow]note:[/] no compliance openers/patterns: the search cannot tell fragments from answers")

    name = study_name(settings, prompts, config)
    study_dir = settings.study_path()
    journal = study_dir / "journal.log"  # a full disk while writing it: a UserError; the re-run repairs and resumes
    directions_path = study_dir / f"{name}.directions.safetensors"
    repaired = lambda note: console.print(f"[yellow]journal repaired:[/] {note}", highlight=False)
    shared = gentle_study = gentle_directions = None
    if settings.storage is None:
        # the name hashes the model's path; its content is checked here: a model replaced at that path starts over
        study = open_study_of_model(journal, name, model_fingerprint(settings.model), settings.model, directions_path,
                                    console, on_repair=repaired)
        directions = stored_directions(study)  # a study begun with --workers keeps them in itself
        if directions is None:
            directions = load_or_compute_directions(directions_path, model, architecture,
                                                    tokenizer, prompts, settings, evaluator.batch_size, console)
        else:
            console.print("directions: reusing the study's (stored by its shared search)")
        if settings.gentle_share > 0:  # the gentle regime's study and directions, beside the product's
            gentle_name = gentle_study_name(name)
            gentle_path = study_dir / f"{gentle_name}.directions.safetensors"
            gentle_study = open_study_of_model(journal, gentle_name, model_fingerprint(settings.model), settings.model,
                                               gentle_path, console, on_repair=repaired)
            gentle_directions = load_or_compute_directions(gentle_path, model, architecture, tokenizer, prompts,
                                                           gentle_direction_settings(settings), evaluator.batch_size,
                                                           console)
    else:
        shared = SharedSearch.open(settings, name, console, on_repair=repaired)
        study = shared.study
        # a study begun by one process keeps its directions beside its journal: the shared search takes those
        directions = shared.directions(lambda: load_file(str(directions_path))["refusal_directions"]
                                       if directions_path.is_file() else
                                       compute_directions(model, architecture, tokenizer, prompts, settings,
                                                          evaluator.batch_size, console))
    abliterator = LoraAbliterator(model, architecture.components, method=settings.method, rank=settings.lowrank_rank,
                                  seed=SVD_SEED, direction_rank=directions.shape[1] if directions.ndim == 3 else 1)
    for skipped in abliterator.skipped:
        console.print(f"[yellow]skipped:[/] {skipped.component.parameter_path} ({skipped.reason})")
    # the residual passes and the adapters' injection leave free blocks the trials' shapes do not reuse; handed
    # back, the first trial's edit no longer lands on top of them (8B-shaped bench, H200: reserved 6,114 -> 5,754
    # MiB before the first trial; the run's peak is now the residual passes' own, 7,214,202,880 B)
    release_free_device_memory(model)
    placement = abliterator.placement_summary()
    offloaded = f" ({placement['offloaded']} offloaded by the device_map, edited through accelerate's weights map)" \
        if placement["offloaded"] else ""
    studies = [study] + ([gentle_study] if gentle_study is not None else [])
    done = sum(len(completed_trials(one)) for one in studies)
    console.print(f"editing {len(abliterator.components)} components{offloaded}, skipped {len(abliterator.skipped)}; "
                  f"study {name} in {study_dir if shared is None else shared.spec.describe()} ({done}/{settings.n_trials} trials done)")
    split = split_trials(settings.n_trials, settings.n_startup_trials, settings.gentle_share)
    if gentle_study is not None:
        console.print(f"gentle regime: {split.n_gentle} of the {settings.n_trials} trials ({split.gentle_startup} random) "
                      f"in study {gentle_study.study_name}, {settings.gentle_depth} depth, the projected single "
                      f"direction, damage max(KL, {settings.gentle_kl_target:g})")
    if len(placement["components_by_device"]) > 1:
        console.print("components by device: " + ", ".join(f"{device} {count}" for device, count
                                                            in placement["components_by_device"].items()))
    checked = {"offloaded_edits": not placement["offloaded"]}

    groups = sorted({c.group for c in abliterator.components})

    def evaluate(parameters: AbliterationParameters, trial_directions: torch.Tensor = directions) -> TrialMetrics:
        abliterator.apply(parameters, trial_directions)
        try:
            metrics = TrialMetrics.from_eval_result(evaluator.evaluate(model))
            if not checked["offloaded_edits"]:  # once: every offloaded edit reached a forward pass
                checked["offloaded_edits"] = abliterator.require_offloaded_edits_served() > 0
            return metrics
        finally:
            abliterator.reset()

    with Progress(TextColumn("trials"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("ETA"), TimeRemainingColumn(), console=console) as progress:
        task = progress.add_task("trials", total=settings.n_trials, completed=done)

        def report(outcome: TrialOutcome, done: int, total: int, eta: float | None) -> None:
            progress.update(task, completed=done)
            regime = f" {outcome.regime}" if outcome.regime is not None else ""
            progress.console.print(f"trial {outcome.number:>3}{regime} {describe_parameters(outcome.parameters)} | "
                                   f"{describe_metrics(outcome.metrics)} | {outcome.seconds:.1f}s ETA {_duration(eta)}")

        def failed(number: int, error: BaseException) -> None:
            progress.console.print(f"[red]trial {number} failed:[/] {error}")

        search = {"suggest": lambda trial: suggest_parameters(trial, architecture.num_layers, groups,
                                                              settings.direction_scope, settings.search_depth),
                  "evaluate": evaluate, "base": base, "n_trials": settings.n_trials, "seed": settings.seed,
                  "n_startup_trials": settings.n_startup_trials, "kl_target": settings.kl_target, "report": report,
                  "on_failure": failed}
        if gentle_study is not None:
            gentle = {**search, "evaluate": lambda parameters: evaluate(parameters, gentle_directions),
                      "suggest": lambda trial: suggest_parameters(trial, architecture.num_layers, groups,
                                                                  settings.direction_scope, settings.gentle_depth),
                      "kl_target": settings.gentle_kl_target}
            own = ("n_trials", "n_startup_trials", "report")
            with no_space_left(journal):
                run_mixed_trials({PRODUCT: study, GENTLE: gentle_study},
                                 {regime: {k: v for k, v in one.items() if k not in own}
                                  for regime, one in ((PRODUCT, search), (GENTLE, gentle))}, split, report)
        elif shared is None:
            with no_space_left(journal):
                run_trials(study, **search)
        else:
            shared.run(search, progress.console)
    if settings.search_only:
        console.print(f"search-only worker: no trial left to take in study {name} "
                      f"({len(completed_trials(study))}/{settings.n_trials} complete); the output is written by a worker "
                      "without --search_only")
        return None

    candidates = candidates_of(study, base, gentle_study)
    front = pareto_front(candidates)
    console.print(front_table(front))
    chosen, reason = choose(settings, candidates, front, base.n_harmful, console, len(prompts.harmless_test), base)
    console.print(f"chosen: trial {chosen.number} - {reason}")
    trial = next(t for one in studies for t in completed_trials(one) if search_number(t) == chosen.number)
    parameters = trial_parameters(trial)
    gentle_trial = gentle_study is not None and trial_regime(trial) == GENTLE
    trial_directions = gentle_directions if gentle_trial else directions
    regime = {"regime": regime_record(trial, (gentle_study if gentle_trial else study).study_name, settings)} \
        if gentle_study is not None else {}
    with no_space_left(out), atomic_output_dir(out, settings.overwrite) as temporary:
        write_chosen_trial(
            temporary,
            header={
                "model": settings.model, "source_format": loaded.source_format, "trial_number": chosen.number,
                "study_name": name,
                "journal": str((study_dir / "journal.log").absolute()) if shared is None else shared.spec.describe(),
                "selection": reason,
                "method": settings.method, "rank": abliterator.rank, "svd_seed": SVD_SEED,
                "parameters": parameters.to_dict(), "layers_path": architecture.layers_path,
                "num_layers": architecture.num_layers, "hidden_size": architecture.hidden_size,
                "skipped": [{"parameter": s.component.parameter_path, "reason": s.reason} for s in abliterator.skipped],
                "placement": placement,
                "metrics": chosen.metrics.to_dict(), "base_metrics": base.to_dict(),
                "settings": json.loads(settings.model_dump_json()) | ({"storage": shared.spec.describe()} if shared else {}),
                "settings_sources": settings_sources or {},
                **regime,
            },
            edits=plan_edits(parameters, abliterator.components),
            directions=trial_directions,
            edit_vectors=edit_directions(parameters, trial_directions),
        )
        front_records = [{"trial": c.number, **({"regime": c.regime} if c.regime else {}),
                          "effective_refusals": c.effective_refusals, **c.metrics.to_dict()} for c in front]
        (temporary / "pareto_front.json").write_text(json.dumps(front_records, indent=2) + "\n")
        if settings.plot:
            plot_front(candidates, front, temporary / "pareto.png", base.refusals)
    console.print(f"wrote {out}")
    return out
