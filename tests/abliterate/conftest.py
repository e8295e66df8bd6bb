import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest


@pytest.fixture(autouse=True)
def _tiny_models_on_one_thread(one_cpu_thread):
    """Every test here uses tiny models: run each on one thread (tests/conftest.py says why)."""
