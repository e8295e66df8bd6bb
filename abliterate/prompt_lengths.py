"""Every prompt must fit the model's context, with room for its answer: refuse, naming the file and the prompt.

A prompt longer than the context is not an error to transformers, only a
warning; the model then attends past its positions and answers garbage (the
unedited model "refused" 0 of 10 prompts it refuses when they fit), so every
measurement of the search would be wrong. We check each rendered prompt (chat
template, system prompt) before the first evaluation. Train prompts only need
to fit; test prompts need room for the tokens generated after them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from abliterate.evaluation.generation import format_chat_prompts
from foundation.errors import UserError

_NO_LIMIT = 10**8  # tokenizers without a limit report ~1e30 as model_max_length


def context_length(model_config, tokenizer) -> int | None:
    """The model's context in tokens (the smaller of config and tokenizer limits); None when neither states one."""
    config = getattr(model_config, "text_config", None) or model_config
    limits = [getattr(config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [int(limit) for limit in limits if isinstance(limit, (int, float)) and 0 < limit < _NO_LIMIT]
    return min(limits) if limits else None


def prompt_files(inputs) -> dict[str, str]:
    """Where each set was read from: its override flag's file, else the file the spec names (else the spec)."""
    spec = Path(inputs.prompt_spec())
    try:
        named = yaml.safe_load(spec.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        named = {}
    files = {}
    for name in ("harmful_train", "harmless_train", "harmful_test", "harmless_test", "lookalike_test", "skill_test"):
        if name in ("lookalike_test", "skill_test") and not (isinstance(named, dict) and name in named):
            continue  # only a spec names these (no override flag); absent: not measured
        override = getattr(inputs, name, None)
        if override is not None:
            files[name] = f"{override} (--{name})"
        elif isinstance(named, dict) and isinstance(named.get(name), str):
            files[name] = f"{spec.parent / named[name]} ({name} of {spec})"
        else:
            files[name] = f"{spec} ({name})"
    return files


def require_prompts_fit(sets: Mapping[str, Sequence[str]], answer_tokens: Mapping[str, int], files: Mapping[str, str],
                        tokenizer, context: int | None, system_prompt: str | None = None) -> None:
    """UserError for the first prompt that (with its answer) does not fit ``context``; None context: no check."""
    if context is None:
        return
    for name, prompts in sets.items():
        answer = answer_tokens.get(name, 0)
        lengths = [len(ids) for ids in format_chat_prompts(tokenizer, prompts, system_prompt)]
        too_long = [i for i, length in enumerate(lengths) if length + answer > context]
        if not too_long:
            continue
        first = too_long[0]
        needs = f"{lengths[first]} tokens" + (f" + {answer} answer tokens" if answer else "")
        raise UserError(
            files.get(name, name),
            f"prompt {first + 1} of {name} ({prompts[first][:60]!r}) needs {needs} as the chat template renders it, "
            f"more than the model's context of {context} tokens ({len(too_long)} of {len(prompts)} prompts of this set "
            f"do not fit, numbers {[i + 1 for i in too_long[:10]]}); the model would answer from positions it was "
            "never trained on and every measurement of the search would be wrong",
            "shorten or remove those prompts" + (", lower --max_response_length / --kl_tokens" if answer else "")
            + ", or use a model with a longer context",
        )
