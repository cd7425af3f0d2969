"""Foundation: package import, model loading, data sources, perplexity, CLI errors."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from seft.data import calibration_windows, clean_wiki_markup, load_documents, packed_blocks, token_stream
from seft.errors import SeftError
from seft.models import decoder_layers, load_model, parse_dtype, resolve_model_path, target_linears


def test_import_is_light():
    """`import seft` must not drag in lm_eval or datasets (they are slow and optional)."""
    code = "import sys, seft; print(int('lm_eval' in sys.modules), int('datasets' in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["0", "0"]


def test_decoder_layers_and_targets(tiny_model):
    layers = decoder_layers(tiny_model)
    assert len(layers) == 2
    linears = target_linears(layers[0])
    assert list(linears) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert linears["down_proj"].weight.shape == (64, 128)


def test_unsupported_architecture_is_clear(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(SeftError, match=r"unsupported architecture 'gpt2'.*supported: llama, mistral"):
        load_model(tmp_path)


def test_bad_model_names(tmp_path):
    with pytest.raises(SeftError, match="no model folder 'smollm2-13m'.*did you mean smollm2-135m"):
        resolve_model_path("smollm2-13m")
    with pytest.raises(SeftError, match="no config.json"):
        resolve_model_path(tmp_path)
    with pytest.raises(SeftError, match="unknown dtype 'fp8'"):
        parse_dtype("fp8")


def test_local_roundtrip_with_dtype(tmp_path, tiny_llama, tiny_tokenizer):
    tiny_llama.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    model, tok = load_model(tmp_path, dtype="bf16")
    assert model.dtype == torch.bfloat16 and tok.pad_token is not None
    model, _ = load_model(tmp_path)
    ids = torch.tensor([[1, 5, 9, 22]])
    assert torch.equal(model(ids).logits, tiny_llama(ids).logits)


def test_wiki_cleaning_removes_markup():
    raw = "{{Infobox|a={{b}}}}'''Paris''' is the [[capital city|capital]] of [[France]].<ref>x</ref>\n== History ==\n[[Category:Cities]]"
    assert clean_wiki_markup(raw) == "Paris is the capital of France.\nHistory"


@pytest.mark.parametrize("source", ["wiki", "news", "pydoc"])
def test_builtin_sources_split_disjoint(source):
    train, held = load_documents(source, "train"), load_documents(source, "heldout")
    assert train and held and not set(train) & set(held)
    assert len(train) + len(held) == len(load_documents(source, "all"))
    text = " ".join(held)
    assert "{{" not in text and "[[" not in text


def test_local_sources(tmp_path, tiny_text_file):
    docs = load_documents(str(tiny_text_file), "all")
    assert "\n\n".join(docs) == tiny_text_file.read_text(encoding="utf-8") and len(docs) > 50
    jl = tmp_path / "d.jsonl"
    jl.write_text('{"text": "a b"}\n{"text": "c d"}\n')
    assert load_documents(str(jl), "all") == ["a b", "c d"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(SeftError, match="needs a 'text' field"):
        load_documents(str(bad), "all")


def test_unknown_source():
    with pytest.raises(SeftError, match="unknown text source 'wikki'.*did you mean wiki"):
        load_documents("wikki")
    with pytest.raises(SeftError, match="unknown split"):
        load_documents("wiki", "test")


def test_calibration_windows_seeded(tiny_tokenizer, tiny_text_file):
    a = calibration_windows(tiny_tokenizer, str(tiny_text_file), 4, 32, seed=0)
    b = calibration_windows(tiny_tokenizer, str(tiny_text_file), 4, 32, seed=0)
    c = calibration_windows(tiny_tokenizer, str(tiny_text_file), 4, 32, seed=1)
    assert a.shape == (4, 32) and torch.equal(a, b) and not torch.equal(a, c)
    stream = token_stream(tiny_tokenizer, str(tiny_text_file), "train")
    blocks = packed_blocks(tiny_tokenizer, str(tiny_text_file), 32)
    assert torch.equal(blocks.flatten(), stream[: blocks.numel()])
    with pytest.raises(SeftError, match="fewer than seq_len"):
        calibration_windows(tiny_tokenizer, str(tiny_text_file), 1, 10**7)


def test_cli_errors_are_one_line():
    proc = subprocess.run([sys.executable, "-m", "seft", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "seft" in proc.stdout


@pytest.mark.slow
def test_smollm2_embedded(smollm2):
    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    n = sum(p.numel() for p in model.parameters())
    assert 134_000_000 < n < 135_000_000
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0][ids["input_ids"].shape[1]:])


@pytest.mark.slow
def test_smollm2_cached_load_is_fast(smollm2):
    t0 = time.perf_counter()
    model, _ = load_model("smollm2-135m")
    assert time.perf_counter() - t0 < 60  # generous: the GGUF path takes ~25 s + dequantisation
    ref, _ = smollm2
    assert torch.equal(model.model.layers[3].mlp.down_proj.weight, ref.model.layers[3].mlp.down_proj.weight)


def test_instruction_data_masks_prompt(tmp_path, smollm2_tokenizer_or_tiny):
    from seft.data import pad_collate, training_dataset

    tok = smollm2_tokenizer_or_tiny
    path = tmp_path / "sft.jsonl"
    rows = [{"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(20)]
    path.write_text("\n".join(__import__("json").dumps(r) for r in rows))
    ds = training_dataset(tok, str(path), seq_len=64)
    assert len(ds) == 18  # every 10th row is held out
    ex = ds[0]
    n_prompt = sum(1 for t in ex["labels"] if t == -100)
    assert 0 < n_prompt < len(ex["input_ids"])
    response = tok.decode([t for t in ex["labels"] if t != -100])
    assert "It is 0." in response and "What is" not in response
    batch = pad_collate(tok.pad_token_id)([ds[0], ds[5]])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert ((batch["attention_mask"] == 0) <= (batch["labels"] == -100)).all()


def test_text_training_blocks(tiny_tokenizer, tiny_text_file):
    from seft.data import BlockDataset, training_dataset

    ds = training_dataset(tiny_tokenizer, str(tiny_text_file), seq_len=32)
    assert isinstance(ds, BlockDataset) and torch.equal(ds[0]["input_ids"], ds[0]["labels"])
