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
