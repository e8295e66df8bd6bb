"""Seed-compatible entry point: ``python quantize_nvfp4.py --input_model ... --output_model ...``.

Same flags and code as ``quant-abliterate quantize``; reads ./.env when present.
"""

import sys

from quantize.cli import seed_script_main

if __name__ == "__main__":
    sys.exit(seed_script_main(offload=False, prog="quantize_nvfp4.py"))
