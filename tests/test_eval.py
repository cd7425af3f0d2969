"""`seft eval`: suites, offline lm-eval tasks, tiny-model runs, adapters, bad input."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from seft.errors import SeftError
from seft.eval_tasks import LOCAL_TASKS_DIR, REPO_EVAL_DIR, Suite, load_suite

pytest.importorskip("lm_eval")

BB_TASK = "bb_general_knowledge"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    from conftest import build_tiny_model

    path = tmp_path_factory.mktemp("tiny") / "base"
    build_tiny_model("llama").save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, tiny_dir) -> Path:
    """A plain peft LoRA adapter with non-zero B, so it changes the model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                 init_lora_weights=False))
    path = tmp_path_factory.mktemp("lora") / "adapter"
    peft_model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def merged_dir(tmp_path_factory, tiny_dir, lora_dir, tiny_tokenizer) -> Path:
    from seft.evaluate import load_for_eval

    path = tmp_path_factory.mktemp("merged") / "merged"
    loaded = load_for_eval(tiny_dir, lora_dir, device="cpu", merge=True)
    loaded.model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def tiny_suite(tmp_path: Path, tasks: list[str], limit: int = 4) -> Suite:
    text = {"tasks": tasks, "limit": limit, "perplexity": [{"source": "wiki", "seq_len": 64, "max_windows": 4}]}
    path = tmp_path / "tiny.yaml"
    path.write_text(json.dumps(text))  # JSON is YAML
    return load_suite(path)


# --- suites and tasks -----------------------------------------------------------------

def test_shipped_suites_load():
    offline, paper = load_suite(REPO_EVAL_DIR / "offline.yaml"), load_suite(REPO_EVAL_DIR / "paper.yaml")
    assert BB_TASK in offline.tasks and all(t.startswith("bb_") for t in offline.tasks)
    assert offline.perplexity and all(p.seq_len for p in offline.perplexity)
    assert offline.perplexity[0].name.startswith("sparsegpt_ppl_wiki_heldout_seq")
    assert set(paper.tasks) == {"boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"}


def test_suite_is_strict(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [a]\nlimt: 3\n")
    with pytest.raises(SeftError, match="unknown key 'limt'.*did you mean limit"):
        load_suite(bad)
    bad.write_text("perplexity:\n  - source: wiki\n")
    with pytest.raises(SeftError, match="explicit seq_len"):
        load_suite(bad)
    with pytest.raises(SeftError, match="no suite file.*offline.yaml"):
        load_suite(tmp_path / "nope.yaml")


def test_vendored_tasks_load_offline():
    """Every YAML in eval/tasks builds its dataset with the hub off."""
    from seft.eval_tasks import include_paths, task_manager

    manager = task_manager(include_paths())
    names = sorted(p.stem for p in LOCAL_TASKS_DIR.glob("*.yaml"))
    assert BB_TASK in names and "wiki_heldout_rolling" in names
    loaded = manager.load(names)["tasks"]
    for name in names:
        task = loaded[name]
        docs = list(task.test_docs())
        assert (20 if name.startswith("bb_") else 5) <= len(docs) <= 300, name
        if name.startswith("bb_"):
            doc = docs[0]
            assert task.doc_to_text(doc).endswith("A:") and 0 <= task.doc_to_target(doc) < len(doc["choices"])


# --- tiny-model runs --------------------------------------------------------------------

def test_tiny_end_to_end_cli(tmp_path, tiny_dir, capsys):
    from seft.cli import main

    suite = tmp_path / "s.yaml"
    suite.write_text(f"tasks: [{BB_TASK}, wiki_heldout_rolling]\nperplexity:\n  - {{source: wiki, seq_len: 64, max_windows: 4}}\n")
    out = tmp_path / "r.json"
    rc = main(["eval", "--model", str(tiny_dir), "--suite", str(suite), "--limit", "3", "--batch-size", "4",
               "--device", "cpu", "--output", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["seft"]["base_sparsity"] == 0.0 and report["seft"]["adapter"] is None
    assert 0.0 <= report["lm_eval"]["results"][BB_TASK]["acc,none"] <= 1.0
    assert report["lm_eval"]["results"]["wiki_heldout_rolling"]["word_perplexity,none"] > 1
    (ppl,) = report["perplexity"]
    assert ppl["windows"] == 4 and ppl["tokens"] == 4 * 63 and ppl["seq_len"] == 64
    table = capsys.readouterr().out
    assert f"| {BB_TASK} | acc |" in table and "sparsegpt_ppl_wiki_heldout_seq64" in table


def _scores(report: dict) -> dict[str, float]:
    out = {f"{t}/{k}": v for t, m in report["lm_eval"]["results"].items() for k, v in m.items()
           if isinstance(v, float) and "stderr" not in k}
    out.update({p["name"]: p["perplexity"] for p in report["perplexity"]})
    return out


def test_adapter_eval_equals_merged_eval(tmp_path, tiny_dir, lora_dir, merged_dir):
    from seft.evaluate import evaluate

    suite = tiny_suite(tmp_path, [BB_TASK, "wiki_heldout_rolling"], limit=3)
    unmerged = evaluate(tiny_dir, suite=suite, adapter=lora_dir, device="cpu", batch_size=4)
    merged = evaluate(merged_dir, suite=suite, device="cpu", batch_size=4)
    base = evaluate(tiny_dir, suite=suite, device="cpu", batch_size=4)
    assert unmerged["seft"]["adapter"]["peft_type"] == "LORA"
    a, b, c = _scores(unmerged), _scores(merged), _scores(base)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-5), key
    assert a["sparsegpt_ppl_wiki_heldout_seq64"] != c["sparsegpt_ppl_wiki_heldout_seq64"]  # the adapter did something


def test_stock_lm_eval_cli_on_adapter_equals_seft_eval_on_merged(tmp_path, tiny_dir, lora_dir, merged_dir):
    """lm-eval's own CLI (seft imported first) on base + adapter == `seft eval` on the merged model."""
    from seft.evaluate import evaluate

    out_dir = tmp_path / "lm_eval_out"
    cmd = [sys.executable, "-m", "seft.lm_eval_cli", "run", "--model", "seft",
           "--model_args", f"pretrained={tiny_dir},adapter={lora_dir}", "--device", "cpu",
           "--include_path", str(LOCAL_TASKS_DIR), "--tasks", "wiki_heldout_rolling", "--limit", "3",
           "--batch_size", "4", "--output_path", str(out_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result_file,) = out_dir.rglob("results_*.json")
    stock = json.loads(result_file.read_text())["results"]["wiki_heldout_rolling"]
    ours = evaluate(merged_dir, tasks=["wiki_heldout_rolling"], limit=3, device="cpu", batch_size=4)
    ours = ours["lm_eval"]["results"]["wiki_heldout_rolling"]
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert abs(stock[metric] - ours[metric]) <= 1e-6 * max(1.0, abs(ours[metric])), metric


def test_registered_model_type_in_process(tiny_dir, lora_dir):
    import lm_eval

    import seft.lm_eval_model  # noqa: F401
    from seft.eval_tasks import include_paths, task_manager

    out = lm_eval.simple_evaluate(model="seft", model_args=f"pretrained={tiny_dir},adapter={lora_dir},device=cpu",
                                  tasks=[BB_TASK], limit=2, task_manager=task_manager(include_paths()),
                                  log_samples=False, bootstrap_iters=0)
    assert "acc,none" in out["results"][BB_TASK]


# --- bad input ----------------------------------------------------------------------------

def test_unknown_task_lists_close_matches(tiny_dir):
    from seft.evaluate import evaluate

    with pytest.raises(SeftError, match=r"unknown task 'bb_general_knowlege'; did you mean bb_general_knowledge"):
        evaluate(tiny_dir, tasks=["bb_general_knowlege"], device="cpu")


def test_missing_adapter(tiny_dir, tmp_path):
    from seft.cli import main
    from seft.evaluate import load_for_eval

    with pytest.raises(SeftError, match="no adapter folder"):
        load_for_eval(tiny_dir, tmp_path / "nope", device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SeftError, match="no adapter_config.json"):
        load_for_eval(tiny_dir, tmp_path / "empty", device="cpu")
    assert main(["eval", "--model", str(tiny_dir), "--adapter", str(tmp_path / "nope"), "--tasks", BB_TASK]) == 2


def test_adapter_for_another_base_is_refused(tmp_path, tiny_tokenizer):
    from conftest import build_tiny_model
    from peft import LoraConfig, get_peft_model

    from seft.evaluate import load_for_eval

    other = get_peft_model(build_tiny_model("llama", hidden_size=96), LoraConfig(r=2, target_modules=["q_proj"]))
    other.save_pretrained(tmp_path / "adapter")
    base = tmp_path / "base"
    build_tiny_model("llama").save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    with pytest.raises(SeftError, match=r"does not fit this model.*q_proj.*shape"):
        load_for_eval(base, tmp_path / "adapter", device="cpu")
    deeper = get_peft_model(build_tiny_model("llama", num_hidden_layers=3), LoraConfig(r=2, target_modules=["q_proj"]))
    deeper.save_pretrained(tmp_path / "deeper")
    with pytest.raises(SeftError, match=r"which this model lacks"):
        load_for_eval(base, tmp_path / "deeper", device="cpu")


def test_hub_task_offline_fails_fast(tiny_dir):
    """HF_HUB_OFFLINE=1 + a hub-only task: a one-line error in seconds, before loading the model."""
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "seft", "eval", "--model", str(tiny_dir), "--tasks", f"{BB_TASK},arc_easy"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "arc_easy need datasets from the Hugging Face hub" in last and "offline.yaml" in last
    assert "Traceback" not in proc.stderr and time.perf_counter() - t0 < 120


# --- SEFT adapters -----------------------------------------------------------------------

def test_seft_adapter_unmerged_equals_merged(tmp_path, tiny_dir, tiny_tokenizer):
    tuner = pytest.importorskip("seft.tuner")
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from seft.evaluate import evaluate

    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with torch.no_grad():  # a "pruned" base: zero half of every target weight
        for name, p in base.named_parameters():
            if name.endswith("proj.weight"):
                p.mul_(torch.rand_like(p) > 0.5)
    base.save_pretrained(tmp_path / "pruned")
    tiny_tokenizer.save_pretrained(tmp_path / "pruned")
    model = get_peft_model(base, tuner.SeftConfig(density=0.05))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "seft_values" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(tmp_path / "seft")
    suite = tiny_suite(tmp_path, ["wiki_heldout_rolling"], limit=2)
    unmerged = evaluate(tmp_path / "pruned", suite=suite, adapter=tmp_path / "seft", device="cpu", batch_size=4)
    merged = evaluate(tmp_path / "pruned", suite=suite, adapter=tmp_path / "seft", merge=True, device="cpu", batch_size=4)
    assert unmerged["seft"]["adapter"]["peft_type"] == "SEFT"
    assert merged["seft"]["merged_sparsity"] == pytest.approx(unmerged["seft"]["base_sparsity"], abs=0.02)
    a, b = _scores(unmerged), _scores(merged)
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-6), key


# --- SmolLM2 (slow) -----------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_offline_suite_short():
    from seft.evaluate import evaluate

    report = evaluate("smollm2-135m", suite=load_suite(REPO_EVAL_DIR / "offline.yaml"), limit=8, device="cpu")
    results = report["lm_eval"]["results"]
    assert BB_TASK in results and report["perplexity"][0]["perplexity"] < 100
