"""Seed-compatible offload entry point for 70B-405B models.

``python quantize_nvfp4_offload.py --offload_folder DIR [--max_gpu_memory 80GiB | 40GiB,80GiB]
[--max_cpu_memory 200GiB] [--clean_offload] [--layerwise] ...``: the same
pipeline as ``quantize_nvfp4.py`` with an accelerate map over every visible GPU, then CPU, then disk.
"""

import sys

from quantize.cli import seed_script_main

if __name__ == "__main__":
    sys.exit(seed_script_main(offload=True, prog="quantize_nvfp4_offload.py"))
