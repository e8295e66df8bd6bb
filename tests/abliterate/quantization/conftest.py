import pytest
import torch
from transformers import LlamaForCausalLM

from testbed.tokenizer import train_tokenizer
from tests.tiny_models import llama_config

TEXTS = ["How do I bake bread?", "Tell me a story about a cat.", "Explain how rain forms.", "Write a poem on the sea."]


@pytest.fixture(autouse=True)
def _tiny_models_on_one_thread(one_cpu_thread):
    """Every test here uses tiny models: run each on one thread (tests/conftest.py says why)."""


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A bf16 Llama saved like a Hub model: hidden 64, 2 layers, inputs multiples of 32 (int4 groups, NVFP4 blocks)."""
    tokenizer = train_tokenizer(TEXTS * 4, vocab_size=300)
    config = llama_config(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    directory = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
