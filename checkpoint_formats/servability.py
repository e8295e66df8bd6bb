"""Would vLLM 0.33 / TensorRT-LLM serve this checkpoint? Our own check, run after every export.

A checkpoint our loader reads can still be unservable: vLLM quantizes every
Linear whose name no exclusion matches (so a mangled ``exclude_modules`` entry,
ModelOpt 0.47's NemotronH bug, makes it load ``lm_head`` as NVFP4 and fail),
refuses fused layers (q/k/v, gate/up) quantized "some but not all", and reads
experts only as ``experts.{e}.{gate,up,down}_proj``; TensorRT-LLM asserts that
fused shards share their scales. ``check_servable`` is pure: it reads headers
and a few scalars and returns every problem (tensor + rule), so tests and the
CLI see all of them; ``require_servable`` turns the first into a UserError.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from checkpoint_formats.detect import FormatKind, detect_format
from checkpoint_formats.layout import FUSED_EXPERT_PARTS, scale_sharing_group
from checkpoint_formats.reader import CheckpointReader
from foundation.errors import UserError

RULES = {
    "exclusion": "every exclude_modules / ignore entry matches a module of the checkpoint (exact name, then fnmatch)",
    "unquantized-not-excluded": "a full-precision Linear weight must be excluded, else servers load it as NVFP4",
    "quantized-linear": "a quantized Linear has weight uint8 [out, in/2], weight_scale float8_e4m3fn [out, in/16], "
                        "weight_scale_2 fp32 scalar and input_scale fp32 scalar (none for W4A16)",
    "excluded-but-quantized": "an excluded module must not hold quantized tensors",
    "fused-group": "fused siblings (q/k/v, gate/up) are all quantized or all excluded and share weight_scale_2 "
                   "and input_scale bitwise",
    "expert-layout": "experts are stored one module per expert: experts.{e}.{gate,up,down}_proj.*",
    "index": "the index's weight_map and total_size match the safetensors files",
}
_EXPERT_LEAVES = sorted({name for parts in FUSED_EXPERT_PARTS.values() for part in parts for name in part})
_EXPERT = re.compile(r"(^|\.)experts\.")
_PER_EXPERT = re.compile(r"(^|\.)experts\.\d+\.(" + "|".join(_EXPERT_LEAVES) + r")\.[A-Za-z0-9_]+$")
_NVFP4_KINDS = (FormatKind.MODELOPT_NVFP4, FormatKind.MODELOPT_W4A16_NVFP4)
_BLOCK = 16


@dataclass(frozen=True)
class Problem:
    tensor: str  # tensor, module or config entry the problem is about
    rule: str  # a key of RULES
    detail: str

    def __str__(self) -> str:
        return f"{self.tensor}: [{self.rule}] {self.detail}"


# Input embeddings are never quantized by a server's Linear method, listed in exclude_modules or not.
_EMBEDDING_LEAVES = ("embed_tokens", "embeddings", "embedding", "wte", "wpe", "word_embeddings", "embed_positions")


def _is_embedding(module: str) -> bool:
    return module.rpartition(".")[2] in _EMBEDDING_LEAVES


def ties_embeddings(config: dict | None) -> bool:
    """Tied output embeddings: ``lm_head`` is a module of the model whose weight is stored as the embeddings'."""
    config = config or {}
    text = config.get("text_config") or {}
    return bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))


def checkpoint_modules(tensor_names, config: dict | None = None) -> set[str]:
    """Every module (and parent module) that owns a tensor: ``a.b.weight`` -> {``a``, ``a.b``}; plus a tied
    ``lm_head``, which ModelOpt lists in ``exclude_modules`` although it stores no tensor of its own."""
    modules: set[str] = {"lm_head"} if ties_embeddings(config) else set()
    for name in tensor_names:
        parts = name.split(".")[:-1]
        modules.update(".".join(parts[:end]) for end in range(1, len(parts) + 1))
    return modules


def entry_matches(entry: str, modules: set[str]) -> bool:
    """As vLLM matches an exclusion: the exact module name, else an fnmatch glob over module names."""
    return entry in modules or any(fnmatch.fnmatchcase(module, entry) for module in modules)


def is_excluded(module: str, entries: list[str]) -> bool:
    return any(module == entry or fnmatch.fnmatchcase(module, entry) for entry in entries)


def exclusion_lists(path: Path) -> dict[str, list[str]]:
    """``file: field`` -> its entries (config.json's ``ignore`` wins in vLLM; TensorRT-LLM reads the other)."""
    lists: dict[str, list[str]] = {}
    hf_quant = path / "hf_quant_config.json"
    if hf_quant.is_file():
        quantization = json.loads(hf_quant.read_text()).get("quantization", {})
        lists["hf_quant_config.json: quantization.exclude_modules"] = list(quantization.get("exclude_modules") or [])
    config = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    if "ignore" in config:
        lists["config.json: quantization_config.ignore"] = list(config.get("ignore") or [])
    return lists


def check_servable(path: str | Path) -> list[Problem]:
    """Every servability problem of the checkpoint at ``path`` (empty: servable)."""
    path = Path(path)
    fmt = detect_format(path)
    problems: list[Problem] = []
    with CheckpointReader(fmt) as reader:
        names = reader.names()
        problems += _index_problems(fmt)
        if fmt.kind.is_compressed_tensors or not fmt.kind.is_quantized:
            return problems
        modules = checkpoint_modules(names, fmt.config)
        lists = exclusion_lists(path)
        for field, entries in lists.items():
            problems += [Problem(repr(entry), "exclusion", f"in {field} matches no module of the checkpoint")
                         for entry in entries if not entry_matches(entry, modules)]
        problems += [Problem(name, "expert-layout", "not of the form experts.{e}.{gate,up,down}_proj.<tensor>")
                     for name in names if _EXPERT.search(name) and not _PER_EXPERT.search(name)]
        if fmt.kind in _NVFP4_KINDS:
            problems += _tensor_problems(reader, set(names), lists, weight_only=fmt.kind is not FormatKind.MODELOPT_NVFP4)
    return problems


def _tensor_problems(reader: CheckpointReader, names: set[str], lists: dict[str, list[str]],
                     weight_only: bool) -> list[Problem]:
    """Each exclusion list on its own: vLLM reads config.json's, TensorRT-LLM hf_quant_config.json's."""
    problems: list[Problem] = []
    quantized: set[str] = set()
    full_precision: dict[str, str] = {}  # module -> description of its 2-D float weight
    for name in sorted(names):
        module, _, leaf = name.rpartition(".")
        if leaf != "weight":
            continue
        dtype, shape = reader.metadata(name)
        if dtype == torch.uint8 or f"{module}.weight_scale" in names:
            quantized.add(module)
            problems += _linear_problems(reader, module, names, weight_only)
        elif len(shape) == 2 and dtype.is_floating_point and not _is_embedding(module):
            full_precision[module] = f"{dtype} {list(shape)}"
    for field, entries in lists.items():
        problems += [Problem(f"{module}.weight", "excluded-but-quantized", f"excluded by {field}, yet stored as NVFP4")
                     for module in sorted(quantized) if is_excluded(module, entries)]
        problems += [Problem(f"{module}.weight", "unquantized-not-excluded",
                             f"{described} full precision, but no entry of {field} matches {module!r}")
                     for module, described in full_precision.items() if not is_excluded(module, entries)]
    linears = {n.rpartition(".")[0] for n in names if n.endswith(".weight")}
    return problems + _group_problems(reader, quantized, linears)


def _linear_problems(reader: CheckpointReader, module: str, names: set[str], weight_only: bool) -> list[Problem]:
    def meta(suffix):
        return reader.metadata(f"{module}.{suffix}") if f"{module}.{suffix}" in names else None

    problems = []
    weight = meta("weight")
    if weight[0] != torch.uint8 or len(weight[1]) != 2:
        return [Problem(f"{module}.weight", "quantized-linear", f"is {weight[0]} {list(weight[1])}, not uint8 [out, in/2]")]
    out, columns = weight[1]
    expected = {"weight_scale": (torch.float8_e4m3fn, (out, columns * 2 // _BLOCK)),
                "weight_scale_2": (torch.float32, ()), "input_scale": (torch.float32, ())}
    for suffix, (dtype, shape) in expected.items():
        found = meta(suffix)
        if found is None:
            if not (suffix == "input_scale" and weight_only):
                problems.append(Problem(f"{module}.{suffix}", "quantized-linear", "is missing"))
        elif found[0] != dtype or tuple(found[1]) != shape:
            problems.append(Problem(f"{module}.{suffix}", "quantized-linear",
                                    f"is {found[0]} {list(found[1])}, expected {dtype} {list(shape)}"))
    return problems


def _group_problems(reader, quantized: set[str], linears: set[str]) -> list[Problem]:
    problems, seen = [], set()
    for module in sorted(linears):
        parent, _, leaf = module.rpartition(".")
        group = scale_sharing_group(leaf)
        if group is None or module in seen:
            continue
        members = [f"{parent}.{other}" for other in group if f"{parent}.{other}" in linears]
        seen.update(members)
        states = {member in quantized for member in members}
        if len(states) > 1:
            problems.append(Problem(f"{parent}.{{{','.join(group)}}}", "fused-group",
                                    "some but not all shards are quantized: "
                                    + ", ".join(f"{m} {'NVFP4' if m in quantized else 'full precision'}" for m in members)))
            continue
        if not states or states == {False}:
            continue
        for suffix in ("weight_scale_2", "input_scale"):
            values = {m: reader.get(f"{m}.{suffix}") for m in members if f"{m}.{suffix}" in reader}
            if len(values) > 1:
                first = next(iter(values.values())).reshape(-1).view(torch.int32)
                if any(not torch.equal(v.reshape(-1).view(torch.int32), first) for v in values.values()):
                    problems.append(Problem(f"{parent}.{{{','.join(group)}}}.{suffix}", "fused-group",
                                            "differs between fused shards: "
                                            + ", ".join(f"{m}={float(v.reshape(-1)[0]):.6g}" for m, v in values.items())))
    return problems


def _index_problems(fmt) -> list[Problem]:
    index = fmt.path / "model.safetensors.index.json"
    if not index.is_file():
        return []
    problems = []
    data = json.loads(index.read_text())
    weight_map = data.get("weight_map") or {}
    total = 0
    in_files: dict[str, str] = {}
    for shard in fmt.weight_files:
        header = _header(shard)
        for name, info in header.items():
            if name != "__metadata__":
                in_files[name] = shard.name
                total += info["data_offsets"][1] - info["data_offsets"][0]
    for name, file in weight_map.items():
        if in_files.get(name) != file:
            problems.append(Problem(name, "index", f"weight_map says {file}, the files say {in_files.get(name)}"))
    problems += [Problem(name, "index", f"is in {file} but not in the weight_map")
                 for name, file in in_files.items() if name not in weight_map]
    declared = (data.get("metadata") or {}).get("total_size")
    if declared is not None and int(declared) != total:
        problems.append(Problem(index.name, "index", f"total_size {declared} but the tensors hold {total} bytes"))
    return problems


def _header(shard: Path) -> dict:
    with shard.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        return json.loads(handle.read(length))


def require_servable(path: str | Path, where: str | None = None) -> None:
    """Raise a UserError naming the first problem's tensor and rule (and how many more there are)."""
    problems = check_servable(path)
    if problems:
        first = problems[0]
        more = f" (and {len(problems) - 1} more problem(s): run quant-abliterate verify --serving {path})" \
            if len(problems) > 1 else ""
        raise UserError(f"{where or path}: {first.tensor}", f"not servable, rule {first.rule!r}: {first.detail}{more}",
                        f"{RULES[first.rule]}; fix the export (or its --skip_layers) and write it again")
