"""A word-level tokenizer built offline: one token per whitespace word plus a
BOS, so a test can write a text of exactly N tokens. Importable by subprocesses."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL = ["<pad>", "<s>", "</s>", "[UNK]", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"]
WORDS = [f"w{i}" for i in range(200)] + ["hello", "world", "story", "answer", "question", "code"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
)


def words(count: int, offset: int = 0) -> str:
    """A text that the tiny tokenizer turns into exactly `count` tokens (+ BOS)."""
    return " ".join(WORDS[(offset + i) % 200] for i in range(count))


def tiny_tokenizer(with_chat_template: bool = True) -> PreTrainedTokenizerFast:
    vocab = {token: index for index, token in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="[UNK]", pad_token="<pad>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL[4:]})
    if with_chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
