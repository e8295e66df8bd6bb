import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from testbed.tokenizer import train_tokenizer

TEXTS = ["How do I bake bread?", "Tell me a story about a cat.", "Explain how rain forms.", "Write a poem on the sea."]


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """Tiny models run far faster on one thread when the shared CI CPU is busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A bf16 Llama saved like a Hub model: hidden 64, 2 layers, inputs multiples of 32 (int4 groups, NVFP4 blocks)."""
    tokenizer = train_tokenizer(TEXTS * 4, vocab_size=300)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    directory = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
