"""Shared fixtures: tiny LLaMA/Mistral models built from config, a tokenizer
trained offline on stdlib text, and the embedded SmolLM2 for integration.

Tiny models are random but deterministic (seeded); their weights are made
sparse where a test needs a "pruned" base.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_VOCAB = 384


def _train_tiny_tokenizer():
    from pydoc_data import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(list(topics.topics.values()), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return _train_tiny_tokenizer()


def tiny_config(kind: str = "llama", **overrides):
    from transformers import LlamaConfig, MistralConfig

    common = dict(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False,
    )
    common.update(overrides)
    if kind == "llama":
        return LlamaConfig(**common)
    if kind == "mistral":
        return MistralConfig(sliding_window=32, **common)
    raise ValueError(kind)


def build_tiny_model(kind: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, **overrides), dtype=torch.float32)
    # Wider weights than the default init, so logits are far from uniform and tests have signal.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model.eval()


@pytest.fixture(params=["tiny", "chat"])
def smollm2_tokenizer_or_tiny(request, tiny_tokenizer):
    """The tiny tokenizer (no chat template) and the same with a ChatML template."""
    if request.param == "tiny":
        return tiny_tokenizer
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
    )
    return tok


@pytest.fixture
def tiny_llama():
    return build_tiny_model("llama")


@pytest.fixture
def tiny_mistral():
    return build_tiny_model("mistral")


@pytest.fixture(params=["llama", "mistral"])
def tiny_model(request):
    return build_tiny_model(request.param)


@pytest.fixture(scope="session")
def tiny_text_file(tmp_path_factory) -> Path:
    from pydoc_data import topics

    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    import re

    docs = [re.sub(r"\n\s*\n+", "\n", t.strip()) for t in list(topics.topics.values())[:60]]
    docs = list(dict.fromkeys(d for d in docs if d))
    path.write_text("\n\n".join(docs), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M (fp32) and its tokenizer, loaded once per session."""
    from seft.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_wanda50(tmp_path_factory) -> Path:
    """Path of SmolLM2-135M pruned by Wanda to 50% unstructured (wiki, 16 x 256 tokens, seed 0).

    A plain HF checkpoint + tokenizer + sparsity_report.json, built once per session.
    """
    from seft.prune import PruneConfig, prune_checkpoint

    out = tmp_path_factory.mktemp("pruned") / "smollm2-wanda50"
    config = PruneConfig(method="wanda", sparsity=0.5, pattern="unstructured", calibration="wiki",
                         num_samples=16, seq_len=256, seed=0)
    prune_checkpoint("smollm2-135m", out, config, progress=False)
    return out
