"""The `seft finetune` recipe: methods, the `finetune:` section and the job it resolves to.

Kept apart from seft/finetune.py (the run) so that the CLI, `seft validate`
and `--help` read it without importing torch, transformers or peft; those
load only when a job is checked against SeftConfig / TrainingArguments.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .errors import SeftError, choices_hint

METHODS = ("seft", "seft-norevive", "static", "masked-lora", "lora-reprune", "lora-mask", "full-masked", "lora")
DENSE_METHODS = ("lora",)  # no sparsity promise: a merge may fill the base's zeros
SPARSE_METHODS = tuple(m for m in METHODS if m not in DENSE_METHODS)
SEFT_METHODS = ("seft", "seft-norevive", "static")
MERGE_ONLY = ("lora-reprune", "lora-mask", "full-masked")  # their product exists only merged
DEFAULT_LR = {"full-masked": 5e-5}  # everything else: 2e-3 (adapters train a small delta)
REPORT_NAME = "train_report.json"


@dataclass
class FinetuneConfig:
    """The `finetune:` section of a recipe (adapter: = SeftConfig, train: = TrainingArguments)."""

    data: str = "wiki"
    method: str = "seft"
    seq_len: int = 256
    dtype: str | None = None
    merge: bool = False
    resume: bool = False
    eval_data: str | None = "wiki"  # held-out perplexity before/after; null to skip
    eval_seq_len: int = 256
    eval_windows: int | None = 32
    calibration: str = "wiki"  # lora-reprune's Wanda re-prune
    calibration_samples: int = 32
    calibration_seq_len: int = 256
    lora_alpha: float = 16.0  # LoRA baselines' scale (alpha / rank)
    load_in_4bit: bool = False

    def validate(self) -> FinetuneConfig:
        for name in ("eval_data",):  # `eval_data: none` in a recipe means what `--eval-data none` means
            value = getattr(self, name)
            if isinstance(value, str) and value.strip().lower() in ("none", "null", ""):
                setattr(self, name, None)
        if self.method not in METHODS:
            raise SeftError(f"unknown method {self.method!r}; {choices_hint(self.method, METHODS)}")
        for name in ("seq_len", "eval_seq_len", "calibration_samples", "calibration_seq_len"):
            if int(getattr(self, name)) < 2:
                raise SeftError(f"{name} must be at least 2, got {getattr(self, name)}")
        if self.eval_windows is not None and int(self.eval_windows) < 1:
            raise SeftError(f"eval_windows must be >= 1 or null (all), got {self.eval_windows}")
        if self.load_in_4bit and self.method not in SEFT_METHODS:
            raise SeftError(f"load_in_4bit supports the methods {', '.join(SEFT_METHODS)}, not {self.method}")
        return self

    def check_sources(self) -> None:
        """Every text source names something: checked before the model loads (and not in
        `validate`, so a recipe can be validated on a machine that lacks the data)."""
        from .data import check_source

        for source in (self.data, self.eval_data, self.calibration if self.method == "lora-reprune" else None):
            if source:
                check_source(source)


@dataclass
class FinetuneJob:
    model: str
    output: str
    config: FinetuneConfig
    adapter: dict[str, Any]  # SeftConfig keyword arguments
    train: dict[str, Any]  # TrainingArguments keyword arguments
    overwrite: bool = False

    def as_recipe(self) -> dict:
        return {"model": self.model, "output": self.output, "overwrite": self.overwrite,
                "finetune": dataclasses.asdict(self.config), "adapter": self.resolved_adapter(),
                "train": self.training_overrides()}

    def resolved_adapter(self) -> dict[str, Any]:
        """The SeftConfig fields a recipe can set, with defaults filled in."""
        cfg = self.seft_config()
        out = {name: getattr(cfg, name) for name in seft_field_names()}
        for name, value in out.items():
            if isinstance(value, set):
                out[name] = sorted(value)
        return out

    def seft_config(self):
        from .tuner import SeftConfig

        kwargs = dict(self.adapter)
        if self.config.method == "seft-norevive":
            kwargs["revive_fraction"] = 0.0
        elif self.config.method == "static":
            kwargs["evolve_until"] = 0.0
        return _build(SeftConfig, kwargs, "adapter")

    def rank(self) -> int:
        """The trainable-parameter budget as a LoRA rank (shared by every method)."""
        if self.adapter.get("density") is not None and self.config.method not in SEFT_METHODS:
            raise SeftError(f"method {self.config.method} needs the budget as adapter.lora_rank, not density")
        return int(self.adapter.get("lora_rank") or 8)

    def training_overrides(self) -> dict[str, Any]:
        """Our defaults, then the recipe's `train:` on top."""
        lr = DEFAULT_LR.get(self.config.method, 2e-3)
        defaults = dict(
            max_steps=100, per_device_train_batch_size=4, learning_rate=lr, lr_scheduler_type="cosine",
            warmup_steps=5, logging_steps=10, save_strategy="steps", save_steps=50, save_total_limit=2,
            report_to="none", seed=0, data_seed=0, dataloader_num_workers=0, dataloader_pin_memory=False,
            weight_decay=0.0,
            logging_nan_inf_filter=False,  # a NaN loss must show (and stop the run), not be averaged away
        )
        return defaults | dict(self.train)


def seft_field_names() -> list[str]:
    """SeftConfig's own fields (what a recipe's `adapter:` sets), without PeftConfig's bookkeeping."""
    from peft.config import PeftConfig

    from .seft_options import RECORDS
    from .tuner import SeftConfig

    inherited = {f.name for f in dataclasses.fields(PeftConfig)} | set(RECORDS)
    return [f.name for f in dataclasses.fields(SeftConfig) if f.init and f.name not in inherited]


def _build(cls, kwargs: dict, section: str):
    from .recipe import build_dataclass

    return build_dataclass(cls, kwargs, section)


RECIPE_KEYS = ["model", "output", "overwrite", "finetune", "adapter", "train"]


def job_from_recipe(recipe: dict) -> FinetuneJob:
    """Validate a finetune recipe into a FinetuneJob (unknown keys anywhere are errors)."""
    from .recipe import build_dataclass, check_keys, top_level_bool

    check_keys(recipe, RECIPE_KEYS, "top level")
    for key in ("model", "output"):
        if recipe.get(key) in (None, ""):
            raise SeftError(f"finetune recipe needs a '{key}' entry; top-level keys: {', '.join(RECIPE_KEYS)}")
    config = build_dataclass(FinetuneConfig, recipe.get("finetune"), "finetune").validate()
    for section in ("adapter", "train"):
        if not isinstance(recipe.get(section) or {}, dict):
            raise SeftError(f"section '{section}' must be a mapping of key: value, got {recipe[section]!r}")
    job = FinetuneJob(str(recipe["model"]), str(recipe["output"]), config, dict(recipe.get("adapter") or {}),
                      dict(recipe.get("train") or {}), top_level_bool(recipe, "overwrite"))
    job.seft_config()  # strict check of adapter:
    job.train = _check_train_keys(job.train)  # keys and types only: TrainingArguments checks the hardware
    return job


def _check_train_keys(train: dict) -> dict:
    """`train` with its keys and value types checked (an integral float made an int, as for every section)."""
    from transformers import TrainingArguments

    from .recipe import check_keys, check_types

    check_keys(train, [f.name for f in dataclasses.fields(TrainingArguments) if f.init], "train")
    return check_types(TrainingArguments, train, "train")
