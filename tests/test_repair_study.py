"""benchmarks/repair_study.py: method names pin the SEFT configuration, and run keys survive new study options."""
from __future__ import annotations

import dataclasses
import sys

from seft.eval_tasks import REPO_EVAL_DIR

sys.path.insert(0, str(REPO_EVAL_DIR.parent / "benchmarks"))
import repair_study  # noqa: E402  (a script, importable once benchmarks/ is on the path)

from seft.tuner.config import SeftConfig  # noqa: E402

# fields that are no part of the method: the budget, the targets, the seed, the kernel and the saved-state record
NOT_METHOD = {"target_modules", "exclude_modules", "density", "lora_rank", "candidates", "seed", "kernel",
              "removed_sizes"}


def _spec(adapter: dict) -> dict:
    return dict(setting="wanda70", method="seft-old", finetune_method="seft", adapter=adapter, train={}, seed=0,
                lr=3e-3, steps=300, batch=2, seq_len=128)


def test_old_pins_every_method_field_of_seft_config():
    # a change of SeftConfig's defaults must not change what "seft-old" (or "static") runs
    own = {f.name for f in dataclasses.fields(SeftConfig)} - {f.name for f in dataclasses.fields(SeftConfig.__base__)}
    assert own - NOT_METHOD - set(repair_study.OLD) == set()
    SeftConfig(**repair_study.OLD)  # and every pinned value is valid


def test_run_key_ignores_study_options_at_their_neutral_values_only():
    bare = {k: v for k, v in repair_study.OLD.items() if k not in repair_study.NEUTRAL}
    # rows run before the options existed were keyed without them: the same key with them pinned neutral
    assert repair_study.run_key(_spec(repair_study.OLD)) == repair_study.run_key(_spec(bare))
    # a non-neutral value is a different run
    assert repair_study.run_key(_spec(dict(repair_study.OLD, slot_lr="density"))) != \
        repair_study.run_key(_spec(repair_study.OLD))


def _row(method: str, seed: int, wiki: float) -> dict:
    return dict(setting="wanda70", method=method, seed=seed, lr=3e-3, wiki_ppl=wiki, news_ppl=2 * wiki,
                sparsity=0.7, sparsity_preserved=True, s_per_step=1.0, updates=15, replaced=10, revived=0,
                dropped_young=0, young_share=0.0, loss_jump=0.0, grad_norm_jump=0.0)


def test_ablation_delta_is_paired_by_seed():
    from repair_study_report import ablation_table

    # the reference has a good seed 0 and bad seeds 1, 2; the variant is 10% better on each seed it has
    rows = [_row("seft-new", 0, 100.0), _row("seft-new", 1, 200.0), _row("seft-new", 2, 200.0),
            _row("new-combo", 0, 90.0), _row("new-combo", 1, 180.0), _row("new-combo", 2, 180.0),
            _row("new-p0.1", 0, 110.0)]
    lines = {line.split(" | ")[1]: line for line in ablation_table(rows, "seft-new")[2:]}
    assert "| -10.0% |" in lines["new-combo"]  # against seed 0 alone its mean (150) would read +50%
    assert "| +10.0% |" in lines["new-p0.1"] and "| +0.0% |" in lines["seft-new"]


def test_queue_takes_best_lr_only_from_a_finished_grid(tmp_path, monkeypatch):
    import argparse
    import json

    monkeypatch.setattr(repair_study, "prune_setting", lambda name, calib: tmp_path / name)  # no pruning here
    plan, rows_path = tmp_path / "plan.txt", tmp_path / "rows.jsonl"
    plan.write_text("wanda50 masked-lora 1e-3,3e-3 0\nwanda50 masked-lora best 1\n")
    rows_path.write_text("")
    args = argparse.Namespace(plan=plan, rows=rows_path, calib=128, steps=300, batch=2, seq_len=128,
                              eval_windows=128, lr_from=None)

    def finish(spec: dict, wiki: float) -> None:
        with rows_path.open("a") as fh:
            fh.write(json.dumps(dict(spec, wiki_ppl=wiki)) + "\n")

    grid = repair_study.plan_specs(args)
    assert [(s["lr"], s["seed"]) for s in grid] == [(1e-3, 0), (3e-3, 0)]  # the best line waits
    finish(grid[1], 90.0)  # 3e-3 done, 1e-3 still running: 3e-3 is best so far, but the grid is not finished
    assert [(s["lr"], s["seed"]) for s in repair_study.plan_specs(args)] == [(1e-3, 0), (3e-3, 0)]
    finish(grid[0], 80.0)
    assert [(s["lr"], s["seed"]) for s in repair_study.plan_specs(args)][2:] == [(1e-3, 1)]


def test_report_lists_the_models_before_repair(tmp_path):
    from repair_study_report import write_report

    rows = [dict(_row("masked-lora", 0, 98.0), steps=300, batch=2, seq_len=128)]
    refs = {"wanda70": {"wiki_ppl": 400.0, "news_ppl": 600.0}, "dense": {"wiki_ppl": 30.0, "news_ppl": 50.0}}
    write_report(rows, tmp_path / "r", refs=refs)
    text = (tmp_path / "r.md").read_text()
    assert "| dense | 30.00 | 50.00 |\n| wanda70, no repair | 400.00 | 600.00 |" in text
    write_report(rows, tmp_path / "r")
    assert "not scored yet" in (tmp_path / "r.md").read_text()


def test_report_separates_what_evolution_adds_from_what_the_sparse_form_adds(tmp_path):
    """Beside SEFT vs masked LoRA, the report compares SEFT with fixed random slots (evolution's share) and fixed
    slots with masked LoRA (the sparse delta's own share), each gap judged against the seed spread."""
    from repair_study_report import main_table, verdict, write_report

    rows = [_row(m, seed, wiki + seed) for m, wiki in (("new-combo", 100.0), ("static", 104.0),
                                                       ("masked-lora", 90.0)) for seed in range(3)]
    _, summary = main_table(rows, ["new-combo", "static", "masked-lora"])
    evolution = {line.split(" | ")[1]: line for line in verdict(summary, rival="static")[2:]}
    assert "| new-combo vs static |" in verdict(summary, rival="static")[0]
    assert "| -3.8% | yes |" in evolution["wiki"]  # 101 vs 105, spread 1
    form = {line.split(" | ")[1]: line for line in verdict(summary, seft="static")[2:]}
    assert "| +15.4% | yes |" in form["wiki"]  # 105 vs 91
    write_report([dict(r, steps=300, batch=2, seq_len=128) for r in rows], tmp_path / "study")
    md = (tmp_path / "study.md").read_text()
    assert "## What evolution adds" in md and "| wanda70 | news | 202.00 | 210.00 | -3.8% | yes |" in md
    assert "## Fixed random slots vs masked LoRA" in md


def test_lr_table_shows_news_beside_wiki_and_where_news_prefers_another_lr():
    """The lr is chosen on wiki; a near-tie there can hide a large news difference (Wanda 50%: 39.0 vs 39.0 wiki,
    55.2 vs 57.5 news), so the grid shows both and names the lr news would have chosen."""
    from repair_study_report import lr_table

    rows = [dict(_row("masked-lora", 0, wiki), lr=lr, news_ppl=news)
            for lr, wiki, news in ((1e-3, 39.0, 55.0), (3e-3, 38.9, 57.5), (1e-2, 60.0, 90.0))]
    line = [x for x in lr_table(rows) if x.startswith("| wanda70 | masked-lora |")][0]
    assert "| 39.0 / 55.0 | **38.9 / 57.5** | 60.0 / 90.0 |" in line
    assert line.endswith("| 0.003 | yes | 0.001 (-4.3% news, +0.3% wiki) |")
    same = [dict(r, news_ppl=r["wiki_ppl"]) for r in rows]
    assert [x for x in lr_table(same) if "masked-lora" in x][0].endswith("| yes | same |")
