"""``quant-abliterate export``: merge the chosen trial into full-precision weights and re-export.

Non-interactive with ``--format``; on a terminal without ``--format`` a small
menu offers save / adapter / chat / quit. The flags are generated from
``ExportSettings`` (the pipeline's export stage uses the same object).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from foundation.errors import UserError
from foundation.settings_cli import add_model_arguments, given_values, validate


def build_parser() -> argparse.ArgumentParser:
    """The flags are ExportSettings' fields (positional trial, ``--format`` repeated, ``--no_verify``)."""
    from abliterate.export.settings import ExportSettings

    parser = argparse.ArgumentParser(prog="quant-abliterate export", description=__doc__.splitlines()[0])
    add_model_arguments(parser, ExportSettings)
    return parser


def settings_from_args(args: argparse.Namespace):
    from abliterate.export.settings import ExportSettings

    return validate(ExportSettings, given_values(args, ExportSettings), fix="see 'quant-abliterate export --help'")


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
    if "formats" in vars(args):
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
