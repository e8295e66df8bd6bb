"""``quant-abliterate convert SRC DST --to compressed-tensors|modelopt``."""

from __future__ import annotations

import argparse

from checkpoint_formats.convert import TARGETS, convert_checkpoint


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="quant-abliterate convert",
        description="Convert an NVFP4 checkpoint between ModelOpt and compressed-tensors (vLLM serves both).",
    )
    parser.add_argument("src", help="checkpoint directory to convert")
    parser.add_argument("dst", help="new output directory")
    parser.add_argument("--to", required=True, choices=TARGETS, help="target format")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    args = parser.parse_args(argv)
    out = convert_checkpoint(args.src, args.dst, to=args.to, overwrite=args.overwrite)
    print(f"wrote {args.to} checkpoint to {out}")
    return 0
