"""``quant-abliterate export``: merge the chosen trial into full-precision weights and re-export.

Non-interactive with ``--format``; on a terminal without ``--format`` a small
menu offers save / adapter / chat / quit. The flags map one to one onto
``ExportSettings`` (the pipeline's export stage uses the same object).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from foundation.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quant-abliterate export", description=__doc__.splitlines()[0])
    parser.add_argument("trial", type=Path, help="output directory of 'quant-abliterate abliterate' (chosen_trial.json)")
    parser.add_argument("--output", "-o", type=Path, help="export directory (default: <trial>-<format>); "
                        "several formats go to <output>/<format>")
    parser.add_argument("--format", choices=("nvfp4", "bf16", "adapter"), action="append",
                        help="nvfp4 (stage-1 scales reused), bf16 (plain HF), adapter (PEFT LoRA); repeat for several")
    parser.add_argument("--checkpoint", type=Path,
                        help="the model stage 2 searched on (default: the 'model' in chosen_trial.json)")
    parser.add_argument("--base_model", type=Path,
                        help="original full-precision model to merge into (default: the checkpoint's dequantized weights)")
    parser.add_argument("--recalibrate", action="store_true",
                        help="nvfp4: run a fresh ModelOpt calibration on the merged model instead of reusing scales "
                             "(stage 1's recorded settings; loads the whole merged model)")
    parser.add_argument("--dataset_yaml", type=Path, help="calibration mix for --recalibrate (default: stage 1's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--no_verify", "--no-verify", dest="verify", action="store_false",
                        help="skip reloading and re-measuring")
    parser.add_argument("--refusal_tolerance", type=float, default=0.1,
                        help="refusals/compliance may differ by this many prompts (>= 1) or this fraction (< 1)")
    parser.add_argument("--kl_tolerance", type=float, default=0.02, help="absolute KL tolerance (plus 50%% of the trial's KL)")
    parser.add_argument("--device_map", default=None, help="placement for verification (default: as stage 2)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars (logs, CI)")
    return parser


def settings_from_args(args: argparse.Namespace):
    from abliterate.export.settings import ExportSettings

    values = {key: value for key, value in vars(args).items() if key not in ("format", "no_progress") and value is not None}
    if args.format:
        values["formats"] = tuple(dict.fromkeys(args.format))
    return ExportSettings(**values, progress=not args.no_progress)


def chat(model_dir: Path) -> None:
    """Stream answers of an exported model in the terminal until an empty line."""
    from threading import Thread

    from transformers import TextIteratorStreamer

    from abliterate.loading import load_model

    loaded = load_model(str(model_dir), dtypes=["auto", "bfloat16", "float32"], device_map=None)
    model, tokenizer = loaded.model, loaded.tokenizer
    history: list[dict[str, str]] = []
    while True:
        message = input("you> ").strip()
        if not message:
            return
        history.append({"role": "user", "content": message})
        ids = tokenizer.apply_chat_template(history, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = {**ids, "streamer": streamer, "max_new_tokens": 256, "do_sample": False}
        thread = Thread(target=model.generate, kwargs=kwargs)
        thread.start()
        print("model> ", end="", flush=True)
        answer = "".join(print(piece, end="", flush=True) or piece for piece in streamer)
        thread.join()
        print()
        history.append({"role": "assistant", "content": answer})


def menu(settings) -> int:
    from rich.prompt import Prompt

    from abliterate.export.run import run_exports

    exported: list[Path] = []
    while True:
        choice = Prompt.ask("export", choices=["save", "adapter", "chat", "quit"], default="save")
        if choice == "quit":
            return 0
        if choice == "chat":
            if not exported:
                print("save a model first (save), then chat with it")
            else:
                chat(exported[-1])
            continue
        fmt = Prompt.ask("format", choices=["nvfp4", "bf16"], default="nvfp4") if choice == "save" else "adapter"
        manifests = run_exports(settings, formats=(fmt,), subdirectories=True)
        if fmt != "adapter":
            exported.append(Path(manifests[fmt]["output"]))


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    settings = settings_from_args(args)
    if args.format:
        from abliterate.export.run import run_exports

        run_exports(settings)
        return 0
    if sys.stdin.isatty() and sys.stdout.isatty():
        return menu(settings)
    raise UserError("--format", "no format given and no terminal for the menu",
                    "pass --format nvfp4, --format bf16 and/or --format adapter")


if __name__ == "__main__":
    from foundation.guarded_cli import run_guarded

    sys.exit(run_guarded(main, sys.argv[1:]))
