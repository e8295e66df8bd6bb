"""Replacing some modules' ``forward`` for the length of a block, and knowing which modules run whose code.

Why: the GPU paths of a trial (the fused RMSNorm of the decode step, the token-sliced MLPs of long forwards)
stand in for transformers' code only where a module runs exactly that code, and only while the block runs;
afterwards every module is as transformers built it. A module that already carries a ``forward`` of its own
(an accelerate offload hook, say) is left alone, so its hook is neither bypassed nor removed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FunctionType

import torch


def same_code(function: object, reference: FunctionType) -> bool:
    """True when ``function`` is ``reference``'s code (bytecode, constants and names), so copies of it in other
    model families (transformers' "Copied from") qualify and variants do not."""
    code, expected = getattr(function, "__code__", None), reference.__code__
    return code is not None and (code.co_code, code.co_consts, code.co_names) == (
        expected.co_code, expected.co_consts, expected.co_names)


def runs_code_of(module: torch.nn.Module, function: FunctionType) -> bool:
    """True when the module's class ``forward`` is ``function``'s code (see ``same_code``)."""
    return same_code(type(module).forward, function)


@contextmanager
def swapped_forwards(model: torch.nn.Module, replacement: Callable[[torch.nn.Module], Callable | None]) -> Iterator[int]:
    """Within the block, each module for which ``replacement(module)`` gives a forward runs it; yields how many."""
    swapped = []
    for module in model.modules():
        if "forward" in module.__dict__:
            continue
        forward = replacement(module)
        if forward is not None:
            module.forward = forward
            swapped.append(module)
    try:
        yield len(swapped)
    finally:
        for module in swapped:
            del module.forward
