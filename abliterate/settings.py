"""Every setting of the abliterate stage, in one typed place.

Sources, strongest first: command-line flags (``--n_trials 60``),
environment variables (``QA_N_TRIALS=60``), the ``[abliterate]`` table of
``config.toml`` in the working directory, then the defaults below. The
README's settings table is generated from these descriptions
(``python -m abliterate.settings``), so they are the documentation.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import tomllib
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    CliApp,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from abliterate.evaluation.markers import (
    check_compliance_patterns,
    check_refusal_markers,
)
from abliterate.evaluation.prompt_sets import DEFAULT_SPEC
from abliterate.quantization.options import OPTIONS as QUANTIZATION_OPTIONS
from abliterate.quantization.options import (
    TORCHAO_GROUP_SIZES,
    QuantizationRequest,
    check_overrides,
)
from foundation.devices import check_device_map
from foundation.dtypes import TORCH_DTYPES
from foundation.errors import UserError
from foundation.memory_size import check_memory_size
from foundation.package_data import resolve_data_path
from foundation.validation import user_error_from_validation


class AbliterateSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="QA_",
        toml_file="config.toml",
        extra="forbid",
        cli_implicit_flags=True,
        cli_prog_name="quant-abliterate abliterate",
        cli_kebab_case=False,
        nested_model_default_partial_update=False,
    )

    # --- what to load ---
    model: str = Field(description="Model to abliterate: a local folder (bf16, ModelOpt NVFP4/FP8, compressed-tensors) or a Hub id.")
    dtypes: list[str] = Field(
        default=["auto", "bfloat16", "float16", "float32"],
        description="Dtypes tried in order until the model loads and generates finite logits. 'fp8' (the seed's spelling) loads a pre-quantized FP8 checkpoint in its own format, dequantized to bf16 for the edits; it is never passed on as a torch dtype.",
    )
    device_map: str = Field(default="auto", description="accelerate device_map ('auto', 'cpu', 'cuda:0', ...).")
    load_as: Literal["auto", "packed", "dequantized"] = Field(default="auto", description="How a quantized checkpoint (ModelOpt NVFP4 / W4A16 / W4A8 / FP8, compressed-tensors) is held: packed (4/8-bit weights, matmul kernels dequantize on the fly, the edit as a LoRA side path) or dequantized (a bf16 copy of every weight). auto: packed when the model is placed on a GPU, dequantized on the CPU (no fast kernel there).")
    sibling_fusion: bool = Field(default=False, description="On a packed load on a GPU, multiply q/k/v and gate/up in one NVFP4 matmul each (vLLM fuses them likewise). Off by default: on an 8B-shaped model it saved under 1% of a trial (1.326 against 1.334 s an evaluation) and its larger fused buffers raised the reserved GPU memory by 206 MB (bench/stage2_trial_profile.py, H200); its launches are twice as fast at small batches (q/k/v at 16 tokens: 32.7 -> 16.8 us).")
    max_memory: dict[str, str] | None = Field(default=None, description="Per-device memory caps for device_map, e.g. {\"0\": \"70GiB\", \"cpu\": \"200GiB\"}.")
    offload_folder: str | None = Field(default=None, description="Folder for the weights that fit neither the GPUs nor the CPU (device_map 'auto' with --max_memory caps): accelerate memory-maps them from there; the edits reach them through its offload hook.")
    trust_remote_code: bool = Field(default=False, description="Run the model repository's own Python code. Only set it for repositories you trust.")
    cpu_threads: int | None = Field(default=None, ge=1, description="torch CPU threads (None = torch's default). 1 is far faster for small models on a busy shared CPU.")

    # --- on-the-fly quantization (a plain model quantized as it loads; see abliterate/quantization) ---
    quantization: Literal[QUANTIZATION_OPTIONS] = Field(default="none", description="Quantize a plain model as it loads, to fit a larger one: none, bnb_4bit (NF4, double quant), nvfp4 (our stage-1 codec, weight-only), torchao_int4_weight_only, torchao_int8_weight_only, torchao_int8_dynamic, torchao_float8_weight_only, torchao_float8_dynamic, torchao_autoquant. A choice the device cannot run is refused before loading. The merge always starts from the full-precision model.")
    torchao_group_size: int = Field(default=128, ge=1, description="Group size of torchao_int4_weight_only (a Linear's input size must be a multiple of it).")
    torchao_include_embedding: bool = Field(default=False, description="torchao: quantize the input/output embeddings too (untied first).")
    quantization_overrides: dict[str, str] = Field(default_factory=dict, description="Per-module choice: {regex of the full module name: option or 'none'}, first match wins, e.g. {\"model\\\\.layers\\\\.0\\\\..*\": \"none\"}. torchao options may be mixed; bnb_4bit and nvfp4 accept only 'none'.")

    # --- prompts and evaluation ---
    prompts: Path = Field(default=DEFAULT_SPEC, description="Prompt spec YAML naming the harmful/harmless train/test prompt sets (local files, save_to_disk folders or Hub datasets with split and column), refusal markers and compliance openers.")
    harmful_train: Path | None = Field(default=None, description="Override: harmful prompts for the directions (.txt one per line, or .jsonl with a 'prompt' field).")
    harmless_train: Path | None = Field(default=None, description="Override: harmless prompts for the directions.")
    harmful_test: Path | None = Field(default=None, description="Override: harmful prompts for counting refusals and compliance.")
    harmless_test: Path | None = Field(default=None, description="Override: harmless prompts for the KL divergence and the false refusals.")
    max_train_prompts: int | None = Field(default=None, ge=1, description="Use at most this many prompts of each train set (None = all).")
    max_test_prompts: int | None = Field(default=None, ge=1, description="Use at most this many prompts of each test set (None = all).")
    system_prompt: str | None = Field(default=None, description="System message put before every prompt (None = the chat template's default).")
    refusal_markers: list[str] | None = Field(default=None, description="Lowercase substrings that mark a refusal (None = the prompt spec's, else the built-in list).")
    compliance_openers: list[str] | None = Field(default=None, description="Case-insensitive openers of a well-formed answer (None = the prompt spec's).")
    compliance_patterns: list[str] | None = Field(default=None, description="Regular expressions of a well-formed answer (None = the prompt spec's).")
    max_response_length: int = Field(default=100, ge=1, description="Most tokens generated per harmful prompt; generation stops earlier once the answer is decided.")
    kl_tokens: int = Field(default=8, ge=1, description="KL divergence is averaged over this many generated positions of each harmless prompt.")
    false_refusal_tokens: int | None = Field(default=None, ge=0, description="False refusals (refusal markers in the answers to the harmless test prompts) are counted on the first this many answer tokens, for the unedited model and every trial. None = --kl_tokens, the cheapest: where the edited model's greedy tokens agree with the unedited model's over those positions, the KL pass already decided the answer and only the other prompts are generated. 0 = do not count.")
    judge: str | None = Field(default=None, description="Refusal judge: a local folder or Hub id of a sequence classifier (config id2label with a REFUSAL label; e.g. testbed/judge, the testbed's own) or of a chat LLM asked to answer REFUSAL or COMPLIANCE. Answers in which a refusal marker appeared stay refusals; every other harmful answer is generated to at least --judge_tokens tokens and judged, and the judge's count replaces the markers' in the search and the selection (both counts are recorded). Runs on the model's device. None = markers only.")
    judge_tokens: int = Field(default=128, ge=1, description="With --judge: harmful answers are generated to at least this many tokens (or their end) before the judge reads them.")
    judge_batch_size: int = Field(default=16, ge=1, description="Answers per batch of the judge.")
    batch_size: int | None = Field(default=None, ge=1, description="Prompts per batch (None = the fastest that fits, found automatically).")
    max_batch_size: int = Field(default=128, ge=1, description="Largest batch the automatic batch size tries.")

    # --- directions and edits ---
    direction_projected: bool = Field(default=False, description="Remove the harmless-mean component from each refusal direction before use.")
    directions: Literal["mean_difference", "subspace"] = Field(default="mean_difference", description="mean_difference: one refusal direction per layer (difference of class means). subspace: a rank-direction_rank refusal subspace per layer (the mean difference plus the top singular vectors of the per-prompt harmful-minus-harmless-mean differences), projected out as a whole.")
    direction_rank: int = Field(default=3, ge=1, le=64, description="Rank k of the refusal subspace of --directions subspace (ignored otherwise).")
    search_depth: Literal["late", "full"] = Field(default="late", description="Where in depth the search's edits reach. late: the reference's space, each kernel peaks at layers 0.6L..L-1 and reaches 1..0.6L layers (the later ~half of the model). full: peaks anywhere in 0..L-1, reach up to L layers, so one edit can cover every layer: for models whose refusal is spread over the whole depth (e.g. testbed/hard).")
    direction_scope: Literal["search", "global", "per_layer"] = Field(default="search", description="One interpolated direction for all layers, each layer's own, or let the search choose.")
    method: Literal["rank1", "norm_preserving"] = Field(default="norm_preserving", description="rank1: W' = (I - lambda v v^T) W. norm_preserving: same, then each row's norm restored, delta approximated at rank lowrank_rank.")
    lowrank_rank: int = Field(default=3, ge=1, description="Rank of the norm-preserving delta's approximation (and of its LoRA adapter).")

    # --- search ---
    n_trials: int = Field(default=200, ge=1, description="Total trials of the study (a re-run continues until this many are complete).")
    n_startup_trials: int = Field(default=60, ge=0, description="Random trials before TPE starts modelling (capped at n_trials).")
    seed: int = Field(default=42, description="Seed of the sampler (each trial's sampler is seeded from it and the trial number, so a resumed run proposes what an uninterrupted one would).")
    kl_target: float = Field(default=0.01, gt=0, description="KL below this is 'good enough': the damage objective is max(KL, kl_target).")
    gentle_share: float = Field(default=0.0, description="Share (0 <= s < 1) of the n_trials given to a gentle second regime, searched in a study of its own (its own TPE sampler) beside the product's: the --gentle_depth space, the single refusal direction projected against the harmless mean, and the damage objective max(KL, gentle_kl_target), so that TPE refines edits far below --kl_target. The other trials are the product search unchanged; the front and --select cover the trials of both. 0 = off.")
    gentle_depth: Literal["late", "full"] = Field(default="full", description="With --gentle_share: the search depth of the gentle trials (see --search_depth). full by default: on testbed/hard the projected single direction edits gently at any depth, and removes refusals only where it reaches the early layers (late: none in 30 trials, bench/RESULTS.md).")
    gentle_kl_target: float = Field(default=0.0, description="With --gentle_share: the gentle trials' damage objective is max(KL, this); 0 = the raw KL.")
    storage: str | None = Field(default=None, description="Share the study between workers (processes on this host, or on others): a journal file (journal:PATH or PATH; one host or a shared file system) or a database URL (postgresql://user:password@host:5432/db with the postgres extra, mysql://..., sqlite:///PATH). Every worker started with the same settings and storage joins the same study: trial numbers stay unique, n_trials is the total, the trial of a killed worker is run again, and each worker not started with --search_only selects and writes its output once all trials are complete. None = a journal of this run alone in --study_dir.")
    workers: int = Field(default=1, ge=1, description="Run the search in this many local processes, each pinned to one GPU (CUDA_VISIBLE_DEVICES; round robin when there are fewer GPUs; plain processes on a CPU), sharing --storage (default: journal:<study_dir>/journal.log). This process is the first worker and writes the output; the others log to <study_dir>/worker-N.log.")
    search_only: bool = Field(default=False, description="Only run trials of the shared study (--storage) and exit when none is left to take: no selection, no output. For extra workers started by hand, e.g. on other hosts.")
    heartbeat_seconds: int = Field(default=30, ge=1, description="With --storage: a running trial records a heartbeat this often; one silent for 3x this long is taken as the trial of a killed worker, failed and queued again (at most 3 times) with the same parameters.")

    # --- output and selection ---
    out: Path | None = Field(default=None, description="Output directory (chosen_trial.json, directions.safetensors, pareto.png); default outputs/<model name>-abliterate.")
    study_dir: Path | None = Field(default=None, description="Where the resumable Optuna journal lives; default <out>.study.")
    overwrite: bool = Field(default=False, description="Replace an existing output directory.")
    select: str | None = Field(default=None, description="Non-interactive choice: 'best_kl_under R' (R a refusal count, or a fraction like 0.05 of the harmful test prompts) or 'trial N'; 'best_kl_under R, false_refusals<=F' also caps the false refusals (F a count, or a fraction of the harmless test prompts); where the prompt spec has lookalike_test / skill_test sets, ', lookalike_refusals<=L' (a count or fraction of the look-alike prompts) and ', skill_loss<=S' (percentage points of exact-answer accuracy lost against the unedited model) cap those too. None = ask on a TTY, else 'best_kl_under 0.05'.")
    plot: bool = Field(default=True, description="Write pareto.png (matplotlib).")

    @field_validator("dtypes")
    @classmethod
    def _known_dtypes(cls, value: list[str]) -> list[str]:
        known = {*TORCH_DTYPES, "fp8"}
        unknown = [item for item in value if item not in known]
        if unknown or not value:
            raise ValueError(f"unknown dtype(s) {unknown or value}; choose from {sorted(known)}")
        return value

    @field_validator("refusal_markers")
    @classmethod
    def _usable_markers(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else check_refusal_markers(value)

    @field_validator("compliance_patterns")
    @classmethod
    def _compiling_patterns(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else check_compliance_patterns(value)

    @field_validator("device_map")
    @classmethod
    def _known_device_map(cls, value: str) -> str:
        return check_device_map(value)

    @field_validator("max_memory")
    @classmethod
    def _memory_sizes(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for device, size in (value or {}).items():
            if not re.fullmatch(r"cpu|disk|mps|\d+|(cuda|xpu|npu):\d+", str(device)):
                raise ValueError(f"unknown device {device!r}; keys are GPU indices (\"0\", \"1\", ...), \"cpu\" or \"disk\"")
            check_memory_size(size, f"max_memory[{device!r}]")
        return value

    @field_validator("torchao_group_size")
    @classmethod
    def _supported_group_size(cls, value: int) -> int:
        if value not in TORCHAO_GROUP_SIZES:
            raise ValueError(f"torchao int4 supports group sizes {', '.join(map(str, TORCHAO_GROUP_SIZES))}, not {value} "
                             "(a Linear's input size must also be a multiple of it)")
        return value

    @field_validator("select")
    @classmethod
    def _readable_select(cls, value: str | None) -> str | None:
        """A typo in --select must fail now, not after hours of search when the trial is picked."""
        if value is not None:
            from abliterate.search.selection import parse_selection

            try:
                parse_selection(value, n_harmful=1, n_harmless=1)
            except UserError as error:
                raise ValueError(f"{error.problem}; {error.fix}") from None
        return value

    @field_validator("storage")
    @classmethod
    def _readable_storage(cls, value: str | None) -> str | None:
        """A mistyped URL must fail now, not after the model loaded (connecting waits for the run)."""
        if value is not None:
            from abliterate.search.storage import parse_storage

            try:
                parse_storage(value)
            except UserError as error:
                raise ValueError(f"{error.problem}; {error.fix}") from None
        return value

    @model_validator(mode="after")
    def _search_only_shares(self) -> AbliterateSettings:
        if self.search_only and self.storage is None:
            raise ValueError("--search_only needs --storage: a worker that writes no output only makes sense in a "
                             "shared study; pass the same --storage as the other workers")
        return self

    @model_validator(mode="after")
    def _gentle_regime(self) -> AbliterateSettings:
        """A bad --gentle_share must fail now; a shared study (one sampler per study and worker) is not mixed yet."""
        if not 0.0 <= self.gentle_share < 1.0:
            raise UserError("--gentle_share", f"must be at least 0 and below 1, got {self.gentle_share}",
                            "pass a share of the trials such as 0.33 (0 turns the gentle regime off)")
        if not self.gentle_kl_target >= 0.0:
            raise UserError("--gentle_kl_target", f"must be 0 or more, got {self.gentle_kl_target}",
                            "pass 0 (the raw KL) or a KL below which the gentle trials stop trading KL, e.g. 1e-5")
        if self.gentle_share > 0 and (self.storage is not None or self.workers > 1):
            raise UserError("--gentle_share", "a gentle regime runs in one process only: it cannot be combined with "
                            "--storage or --workers", "drop --gentle_share, or run the search without --storage/--workers")
        return self

    @model_validator(mode="after")
    def _known_overrides(self) -> AbliterateSettings:
        check_overrides(self.quantization, self.quantization_overrides)
        return self

    def quantization_request(self) -> QuantizationRequest:
        return QuantizationRequest(self.quantization, self.torchao_group_size, self.torchao_include_embedding,
                                   check_overrides(self.quantization, self.quantization_overrides))

    @model_validator(mode="after")
    def _startup_within_trials(self) -> AbliterateSettings:
        self.n_startup_trials = min(self.n_startup_trials, self.n_trials)
        return self

    def prompt_spec(self) -> Path:
        """The spec as given; a relative path missing here is looked up in the installed package data."""
        return resolve_data_path(self.prompts)

    def output_dir(self) -> Path:
        return self.out or Path("outputs") / f"{Path(self.model.rstrip('/')).name}-abliterate"

    def study_path(self) -> Path:
        return self.study_dir or self.output_dir().with_name(self.output_dir().name + ".study")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = TomlConfigSettingsSource(settings_cls, toml_table_header=("abliterate",))
        return (init_settings, env_settings, toml)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> AbliterateSettings:
        """These values and the defaults alone: no ``QA_*`` variables, no ``.env``, no ``config.toml``, no argv.

        A pipeline stage is built from its YAML block and fingerprinted by the result; a value
        picked up from the environment or the working directory would change what runs without
        the manifest knowing (``config.toml`` with ``n_trials = 9`` ran 9 trials, and a re-run
        elsewhere reported "up to date"). Validation is the same as for the CLI.
        """
        init = InitSettingsSource(cls, init_kwargs=dict(data))
        return cls(_build_sources=((init,), dict(data)))


def parse_settings(argv: list[str]) -> AbliterateSettings:
    """Settings from argv > env > config.toml; a bad value becomes a UserError naming the flag."""
    try:
        return CliApp.run(AbliterateSettings, cli_args=argv, cli_exit_on_error=False)
    except ValidationError as error:
        raise user_error_from_validation(error, lambda problem: (
            f"--{problem.field or 'settings'}", problem.message, "see 'quant-abliterate abliterate --help'")) from None
    except SystemExit:
        raise
    except Exception as error:  # argparse-level errors from the CLI source
        if type(error).__name__ == "SettingsError":
            raise _user_error_from_settings_error(str(error)) from None
        raise


def outside_sources(argv: list[str], environ: Mapping[str, str] | None = None,
                    toml_path: Path = Path("config.toml")) -> dict[str, str]:
    """Which settings the direct CLI took from ``QA_*`` variables or ``./config.toml`` rather than a flag.

    Printed by ``quant-abliterate abliterate`` so a value nobody typed is visible in the log
    (a pipeline stage never reads either: ``AbliterateSettings.from_mapping``).
    """
    environ = os.environ if environ is None else environ
    given = {arg[2:].split("=", 1)[0].removeprefix("no-").removeprefix("no_") for arg in argv if arg.startswith("--")}
    variables = {key.upper(): key for key in environ}
    table: dict[str, Any] = {}
    if toml_path.is_file():
        table = tomllib.loads(toml_path.read_text(encoding="utf-8")).get("abliterate", {})
    sources = {}
    for name in AbliterateSettings.model_fields:
        if name in given:
            continue
        if f"QA_{name.upper()}" in variables:
            sources[name] = f"environment {variables[f'QA_{name.upper()}']}"
        elif name in table:
            sources[name] = str(toml_path)
    return sources


def _user_error_from_settings_error(message: str) -> UserError:
    """pydantic-settings reports an unparsable value as prose; name the flag and show the dict syntax."""
    match = re.search(r"Parsing error encountered for (\w+): (.*)", message, flags=re.DOTALL)
    if match is None:
        return UserError("command line", message, "see 'quant-abliterate abliterate --help'")
    field, problem = match.groups()
    annotation = str(AbliterateSettings.model_fields[field].annotation) if field in AbliterateSettings.model_fields else ""
    fix = (f"write a JSON object or KEY=VALUE pairs, e.g. --{field} '{{\"KEY\": \"VALUE\"}}' or --{field} KEY=VALUE "
           f"(see 'quant-abliterate abliterate --help')") if "dict" in annotation else "see 'quant-abliterate abliterate --help'"
    return UserError(f"--{field}", f"cannot parse the value ({problem.strip()})", fix)


def settings_table_markdown() -> str:
    """The README's table of every setting, its default and its meaning."""
    lines = ["| flag | env | default | meaning |", "|---|---|---|---|"]
    for name, field in AbliterateSettings.model_fields.items():
        value = field.get_default(call_default_factory=True)
        default = "(required)" if field.is_required() else (str(value) if isinstance(value, Path) else repr(value))
        lines.append(f"| `--{name}` | `QA_{name.upper()}` | `{default}` | {field.description} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(settings_table_markdown())
