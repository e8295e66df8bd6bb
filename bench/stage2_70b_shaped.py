"""Bench (GPU): does our stage 2 run a Llama-3.1-70B-shaped NVFP4 checkpoint on one GPU, and how fast?

Writes a random Llama-3.1-70B-shaped checkpoint directly in ModelOpt's unified NVFP4 layout (DESIGN.md
section 2: per quantized Linear `weight` uint8 [out, in/2], `weight_scale` float8_e4m3fn [out, in/16],
`weight_scale_2` and `input_scale` float32 scalars, q/k/v and gate/up sharing both; embeddings, lm_head and
norms bf16; `hf_quant_config.json` and config.json's `quantization_config` as ModelOpt 0.47 writes them), then
runs `abliterate --load_as packed` on it (few prompts, few trials) and `export --format nvfp4` of the chosen
trial. Shape: hidden 8192, MLP 28672, 80 layers, 64 heads, 8 kv heads, vocab 128256 (Llama 3's, so lm_head and
embeddings cost what they cost in the real model); the tokenizer is the testbed's (1,024 tokens), so prompts
tokenize to ids < 1024 and generated ids >= 1024 decode to nothing. Codes are uniform random bytes; block scales
in [192, 320) and weight_scale_2 = 0.0068 / 256 give dequantized weights of std ~0.02.

Reported in `--out` (JSON): checkpoint bytes, write time, peak GPU memory (nvidia-smi poll, torch peak from the
child), load time (from stage 2's log), seconds per trial, export time. Every step's failure is recorded, not
fatal. The export needs about the checkpoint's size again on disk; it is skipped (and recorded) if the disk
lacks that (the one-GPU machine has 64 GiB: use `--layers 40` there for an export, or a larger machine).

Device, one line (carry [".whl"]):

    pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site python bench/stage2_70b_shaped.py --work /tmp/s70 --out $OUT/stage2_70b_shaped.json

CPU smoke test here:

    .venv/bin/python bench/stage2_70b_shaped.py --size tiny --work /tmp/s70tiny --out /tmp/s70tiny/result.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO))

import stage2_gpu_vs_heretic as common  # noqa: E402  (child-process runner, nvidia-smi poll, journal reading)

SIZES = {
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024),
}
WEIGHT_STD = 0.02
E2M1_RMS = (sum(v * v for v in (0, 0.5, 1, 1.5, 2, 3, 4, 6)) / 8) ** 0.5  # of a uniform random code
BLOCK_SCALE_MEAN = 256.0
SHARD_BYTES = 5 * 10**9
MODELOPT_VERSION = "0.47.0"

SETUP = """\
# on the device (carry [".whl"])
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site
"""


# ---------------------------------------------------------------- the checkpoint

def quant_configs() -> tuple[dict, dict]:
    """hf_quant_config.json and config.json's quantization_config, as ModelOpt 0.47 writes them for NVFP4."""
    exclude = ["lm_head", "model.embed_tokens"]
    producer = {"name": "modelopt", "version": MODELOPT_VERSION}
    hf_quant = {"producer": producer, "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": None,
                                                       "group_size": 16, "exclude_modules": exclude}}
    numbers = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
    in_config = {"config_groups": {"group_0": {"input_activations": dict(numbers), "weights": dict(numbers),
                                               "targets": ["Linear"]}},
                 "ignore": exclude, "quant_algo": "NVFP4", "producer": producer, "quant_method": "modelopt"}
    return hf_quant, in_config


def model_config(shape: dict, layers: int) -> dict:
    from transformers import LlamaConfig

    testbed = json.loads((common.TESTBED / "config.json").read_text())
    config = LlamaConfig(**{**shape, "num_hidden_layers": layers}, max_position_embeddings=8192, rms_norm_eps=1e-5,
                         rope_theta=500000.0, bos_token_id=testbed["bos_token_id"], eos_token_id=testbed["eos_token_id"],
                         pad_token_id=testbed["pad_token_id"], tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    data = config.to_dict()
    data["dtype"] = "bfloat16"
    data["quantization_config"] = quant_configs()[1]
    return data


class TensorMaker:
    """Random NVFP4 tensors with sane scales, generated on `device` (CUDA when there is one)."""

    def __init__(self, device: str, seed: int) -> None:
        import torch

        self.torch, self.device = torch, device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def quantized_linear(self, out_features: int, in_features: int, scale_2, input_scale) -> dict:
        torch = self.torch
        codes = torch.randint(0, 256, (out_features, in_features // 2), dtype=torch.uint8, device=self.device,
                              generator=self.generator)
        blocks = torch.rand((out_features, in_features // 16), device=self.device, generator=self.generator)
        block_scales = (BLOCK_SCALE_MEAN * 0.75 + blocks * BLOCK_SCALE_MEAN * 0.5).to(torch.float8_e4m3fn)
        return {"weight": codes, "weight_scale": block_scales, "weight_scale_2": scale_2, "input_scale": input_scale}

    def shared_scales(self) -> tuple:
        """One weight_scale_2 / input_scale pair for a fused group (q/k/v or gate/up), jittered +-10%."""
        torch = self.torch
        jitter = 0.9 + 0.2 * torch.rand((2,), device=self.device, generator=self.generator)
        scale_2 = (WEIGHT_STD / E2M1_RMS / BLOCK_SCALE_MEAN) * jitter[0]
        input_scale = (4.0 / (6 * 448)) * jitter[1]  # activations up to |4|
        return scale_2.float().reshape(()), input_scale.float().reshape(())

    def bf16(self, *shape: int, std: float | None = None):
        torch = self.torch
        if std is None:
            return torch.ones(shape, dtype=torch.bfloat16, device=self.device)
        return (torch.randn(shape, device=self.device, generator=self.generator) * std).to(torch.bfloat16)


def layer_tensors(maker: TensorMaker, shape: dict, index: int):
    """(name, tensor) of one decoder layer, in checkpoint order."""
    h, inter = shape["hidden_size"], shape["intermediate_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    prefix = f"model.layers.{index}."
    yield prefix + "input_layernorm.weight", maker.bf16(h)
    yield prefix + "post_attention_layernorm.weight", maker.bf16(h)
    qkv_scale_2, qkv_input = maker.shared_scales()
    for name, out_features in (("q_proj", h), ("k_proj", kv), ("v_proj", kv)):
        for key, tensor in maker.quantized_linear(out_features, h, qkv_scale_2, qkv_input).items():
            yield f"{prefix}self_attn.{name}.{key}", tensor
    o_scale_2, o_input = maker.shared_scales()
    for key, tensor in maker.quantized_linear(h, h, o_scale_2, o_input).items():
        yield f"{prefix}self_attn.o_proj.{key}", tensor
    mlp_scale_2, mlp_input = maker.shared_scales()
    for name in ("gate_proj", "up_proj"):
        for key, tensor in maker.quantized_linear(inter, h, mlp_scale_2, mlp_input).items():
            yield f"{prefix}mlp.{name}.{key}", tensor
    down_scale_2, down_input = maker.shared_scales()
    for key, tensor in maker.quantized_linear(h, inter, down_scale_2, down_input).items():
        yield f"{prefix}mlp.down_proj.{key}", tensor


def write_checkpoint(out_dir: Path, shape: dict, layers: int, device: str, seed: int) -> dict:
    from checkpoint_formats.writer import StreamingCheckpointWriter

    started = time.time()
    shutil.rmtree(out_dir, ignore_errors=True)
    writer = StreamingCheckpointWriter(out_dir, max_shard_bytes=SHARD_BYTES)
    maker = TensorMaker(device, seed)
    h, vocab = shape["hidden_size"], shape["vocab_size"]
    writer.add("model.embed_tokens.weight", maker.bf16(vocab, h, std=WEIGHT_STD))
    for index in range(layers):
        for name, tensor in layer_tensors(maker, shape, index):
            writer.add(name, tensor)
    writer.add("model.norm.weight", maker.bf16(h))
    writer.add("lm_head.weight", maker.bf16(vocab, h, std=WEIGHT_STD))
    shards = writer.close()
    hf_quant, _ = quant_configs()
    (out_dir / "hf_quant_config.json").write_text(json.dumps(hf_quant, indent=4))
    (out_dir / "config.json").write_text(json.dumps(model_config(shape, layers), indent=4))
    for name in common.TOKENIZER_FILES + ("generation_config.json",):
        if (common.TESTBED / name).is_file():
            shutil.copy(common.TESTBED / name, out_dir / name)
    total = sum(path.stat().st_size for path in out_dir.iterdir() if path.is_file())
    return {"ok": True, "seconds": time.time() - started, "bytes": total, "tensor_bytes": writer.total_bytes,
            "shards": len(shards), "layers": layers, "shape": shape, "path": str(out_dir), "generated_on": device}


def check_dequantized_std(checkpoint: Path) -> float | None:
    """Std of one dequantized weight (expected ~0.02), from the checkpoint on disk."""
    from safetensors import safe_open

    from checkpoint_formats.nvfp4 import NVFP4Weight, dequantize_weight

    index = checkpoint / "model.safetensors.index.json"
    name = "model.layers.0.self_attn.o_proj"
    if index.is_file():
        shard = checkpoint / json.loads(index.read_text())["weight_map"][name + ".weight"]
    else:
        shard = checkpoint / "model.safetensors"
    with safe_open(str(shard), "pt") as handle:
        parts = {key: handle.get_tensor(f"{name}.{key}") for key in ("weight", "weight_scale", "weight_scale_2")}
    try:
        weight = dequantize_weight(NVFP4Weight(parts["weight"], parts["weight_scale"], parts["weight_scale_2"]))
    except TypeError:
        return None
    return float(weight.float().std())


# ---------------------------------------------------------------- stage 2 and export

def load_seconds(log: Path) -> float | None:
    """Stage 2's own report of the load time, if its log has one ("loaded ... in 12.3 s")."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None
    match = re.search(r"load\w*[^\n]*?\bin (\d+(?:\.\d+)?) ?s\b", text, flags=re.IGNORECASE)
    return float(match.group(1)) if match else None


def run_abliterate(args, checkpoint: Path, prompts: dict, env: dict) -> dict:
    study_dir, out = args.work / "ours_study", args.work / "ours_out"
    shutil.rmtree(study_dir, ignore_errors=True)
    runner = args.work / "ours_runner.py"
    runner.write_text(common.OURS_RUNNER)
    if args.device == "cuda":
        placement = ["--load_as", "packed", "--device_map", "auto", "--max_memory", json.dumps({"0": args.max_gpu_memory})]
    else:
        placement = ["--load_as", "dequantized", "--device_map", "cpu", "--cpu_threads", str(args.cpu_threads)]
    command = [sys.executable, str(runner), "abliterate", "--model", str(checkpoint), *placement,
               "--prompts", prompts["spec"], "--n_trials", str(args.trials), "--n_startup_trials", str(args.trials),
               "--max_response_length", str(args.max_new_tokens), "--out", str(out), "--study_dir", str(study_dir),
               "--overwrite", "--select", "best_kl_under 0.5", "--no-plot", "--seed", str(args.seed)]
    result = common.run_child(command, args.work / "abliterate.log", env, REPO, args.timeout)
    summary = common.summarize(result, study_dir / "journal.log")
    first_trial = summary.get("seconds_to_first_trial")
    timed = (result.torch_memory or {}).get("load_seconds") or []
    summary.update(command=" ".join(command), out=str(out), load_seconds=timed[0] if timed else load_seconds(result.log),
                   chosen=(out / "chosen_trial.json").is_file(),
                   seconds_before_first_trial=(first_trial - summary["trial_seconds"][0]) if first_trial else None)
    return summary


def run_export(args, trial_dir: Path, checkpoint_bytes: int, env: dict) -> dict:
    output = args.export_dir or args.work / "export-nvfp4"
    shutil.rmtree(output, ignore_errors=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(output.parent).free
    if free < checkpoint_bytes * 1.1 + 2**30:
        return {"ok": False, "skipped": True, "error_tail": f"needs ~{checkpoint_bytes * 1.1 / 1e9:.1f} GB free disk, "
                f"{free / 1e9:.1f} GB free; rerun with fewer --layers or on a machine with more disk"}
    command = [sys.executable, str(args.work / "ours_runner.py"), "export", str(trial_dir), "--format", "nvfp4",
               "--output", str(output), "--overwrite", "--no_progress"]
    if args.no_verify:
        command.append("--no_verify")
    result = common.run_child(command, args.work / "export.log", env, REPO, args.export_timeout)
    ok = result.returncode == 0
    written = sum(p.stat().st_size for p in output.rglob("*") if p.is_file()) if output.is_dir() else 0
    return {"ok": ok, "seconds": result.wall_s, "timed_out": result.timed_out, "finished": ok and not result.timed_out,
            "returncode": result.returncode, "bytes_written": written, "peak_gpu_bytes": result.memory.get("peak_bytes"),
            "gpu_memory_poll": result.memory, "torch_memory": result.torch_memory, "command": " ".join(command),
            "log": str(result.log), "error_tail": None if ok else result.tail()}


def step(name: str, function, *args) -> dict:
    """Run one step; an exception becomes the step's recorded error."""
    import traceback

    started = time.time()
    try:
        return function(*args)
    except Exception:  # noqa: BLE001 - every step's failure is recorded, not fatal
        return {"ok": False, "seconds": time.time() - started, "error_tail": traceback.format_exc()[-3000:], "step": name}


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    def num(value, scale=1.0, unit=""):
        return "-" if value is None else f"{value / scale:.2f}{unit}"

    w, s, e = result["write"], result["abliterate"], result["export"]
    table = Table(title=f"stage 2 on a {result['size']}-shaped NVFP4 checkpoint ({result['layers']} layers) - {result['gpu']}")
    table.add_column("measure")
    table.add_column("value")
    rows = [("checkpoint", num(w.get("bytes"), 1e9, " GB")), ("write", num(w.get("seconds"), 1, " s")),
            ("dequantized weight std", num(w.get("dequantized_std"))),
            ("stage 2 ok", str(s.get("ok"))), ("peak GPU memory (stage 2)", num(s.get("peak_gpu_bytes"), 2**30, " GiB")),
            ("load_model", num(s.get("load_seconds"), 1, " s")),
            ("process start to first trial start", num(s.get("seconds_before_first_trial"), 1, " s")),
            ("s / trial", num(s.get("seconds_per_trial"), 1, " s")), ("stage 2 wall", num(s.get("wall_s"), 1, " s")),
            ("export ok", str(e.get("ok"))), ("export", num(e.get("seconds"), 1, " s"))]
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def write_result(args, steps: dict, shape: dict, layers: int, started: float) -> dict:
    write, abliterate, export = steps.get("write", {}), steps.get("abliterate", {}), steps.get("export", {})
    result = {
        "checkpoint_bytes": write.get("bytes"), "write_seconds": write.get("seconds"),
        "peak_gpu_bytes": abliterate.get("peak_gpu_bytes"), "load_seconds": abliterate.get("load_seconds"),
        "seconds_before_first_trial": abliterate.get("seconds_before_first_trial"),
        "seconds_per_trial": abliterate.get("seconds_per_trial"), "export_seconds": export.get("seconds"),
        "export_finished": export.get("finished", False),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "gpu": common.gpu_name(), "versions": common.versions(),
        "command": "python bench/stage2_70b_shaped.py " + " ".join(sys.argv[1:]),
        "size": args.size, "layers": layers, "device": args.device, "trials": args.trials,
        "vocab_note": f"vocab {shape['vocab_size']}; tokenizer: the testbed's ({common.TESTBED}), ids >= its size decode to nothing",
        "prompts": steps.get("prompts"), "max_new_tokens": args.max_new_tokens,
        "write": write, "abliterate": abliterate, "export": export, "complete": "export" in steps,
        "total_seconds": time.time() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="70b")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the size's, 80 for 70b)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/stage2_70b"))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "stage2_70b_shaped.json")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--max_test_prompts", type=int, default=20)
    parser.add_argument("--max_train_prompts", type=int, default=64)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--max_gpu_memory", default="80GiB", help="stage 2's --max_memory for GPU 0")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None)
    parser.add_argument("--cpu_threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=2400, help="seconds for stage 2")
    parser.add_argument("--export_timeout", type=float, default=1800, help="seconds for the export")
    parser.add_argument("--budget_s", type=float, default=580,
                        help="the whole bench ends by then (the device allows 600 s a command); children are cut short")
    parser.add_argument("--no_export", action="store_true")
    parser.add_argument("--export_dir", type=Path, default=None,
                        help="where the export goes (default: WORK/export-nvfp4), e.g. a tmpfs when the disk is small")
    parser.add_argument("--no_verify", action="store_true", help="export without reloading and re-measuring")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and export afterwards")
    parser.add_argument("--print-setup", "--print_setup", action="store_true")
    args = parser.parse_args()
    if args.print_setup:
        print(SETUP)
        return 0
    import torch

    common.DEADLINE[0] = time.time() + args.budget_s
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    shape = SIZES[args.size]
    layers = args.layers or shape["num_hidden_layers"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    started = time.time()
    checkpoint = args.work / "checkpoint-nvfp4"

    steps: dict = {}
    save = lambda: write_result(args, steps, shape, layers, started)  # noqa: E731 - partial results survive a kill
    steps["write"] = write = step("write", write_checkpoint, checkpoint, shape, layers, args.device, args.seed)
    if args.device == "cuda":
        torch.cuda.empty_cache()
    if write.get("ok"):
        try:
            write["dequantized_std"] = check_dequantized_std(checkpoint)
        except Exception as error:  # noqa: BLE001
            write["dequantized_std_error"] = repr(error)
    print(f"write: ok={write.get('ok')} {write.get('bytes', 0) / 1e9:.2f} GB in {write.get('seconds', 0):.1f} s "
          f"(std {write.get('dequantized_std')})", flush=True)
    save()
    prompts = step("prompts", common.write_prompts, args.work / "prompts", args.max_train_prompts, args.max_test_prompts)
    steps["prompts"] = prompts.get("counts")
    steps["abliterate"] = abliterate = (
        step("abliterate", run_abliterate, args, checkpoint, prompts, env) if write.get("ok") and "spec" in prompts
        else {"ok": False, "error_tail": "checkpoint or prompts missing"})
    print(f"abliterate: ok={abliterate.get('ok')} s/trial={abliterate.get('seconds_per_trial')}", flush=True)
    save()
    if args.no_export:
        export = {"ok": False, "skipped": True, "error_tail": "--no_export"}
    elif abliterate.get("chosen"):
        export = step("export", run_export, args, Path(abliterate["out"]), write.get("bytes", 0), env)
    else:
        export = {"ok": False, "skipped": True, "error_tail": "stage 2 chose no trial"}
    steps["export"] = export
    print(f"export: ok={export.get('ok')} {export.get('seconds')}", flush=True)
    result = save()
    print_table(result)
    if not args.keep:
        shutil.rmtree(checkpoint, ignore_errors=True)
        shutil.rmtree(args.export_dir or args.work / "export-nvfp4", ignore_errors=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
