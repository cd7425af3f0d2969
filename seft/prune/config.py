"""`PruneConfig`: every knob of a pruning run, validated before any work starts.

Imports nothing heavy at module level (torch and seft.models load inside the
checks), so `seft prune --help` and recipe parsing start in a blink.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from ..errors import SeftError, choices_hint

if TYPE_CHECKING:
    import torch

    from ..sparsity import Pattern

METHODS = ("magnitude", "wanda", "sparsegpt")


def _target_modules() -> list[str]:
    from ..models import TARGET_MODULES

    return list(TARGET_MODULES)
DATA_FREE = ("magnitude",)


@dataclass
class PruneConfig:
    """What to prune and how.

    `sparsity` may be left out with an N:M `pattern` (it is then 1 - N/M); if
    both are given they must agree. `seq_len` is explicit on purpose: the
    model's `max_position_embeddings` would make CPU runs needlessly slow and
    results incomparable. `dtype` is the dtype the model is loaded and stored
    in (None = as stored); statistics and SparseGPT always run in fp32.
    """

    method: str = "wanda"
    sparsity: float | None = None
    pattern: str | None = "unstructured"
    calibration: str = "wiki"
    num_samples: int = 128
    seq_len: int = 2048
    seed: int = 0
    device: str = "cpu"
    dtype: str | None = None
    batch_size: int = 8
    targets: list[str] = field(default_factory=lambda: _target_modules())
    blocksize: int = 128
    percdamp: float = 0.01

    def validate(self) -> PruneConfig:
        """Check every field (raising SeftError) and normalise sparsity/pattern; returns self."""
        from ..models import TARGET_MODULES, parse_dtype
        from ..sparsity import check_sparsity, format_pattern, parse_pattern

        if self.method not in METHODS:
            raise SeftError(f"unknown pruning method {self.method!r}; {choices_hint(self.method, METHODS)}")
        nm = parse_pattern(self.pattern)
        self.pattern = format_pattern(nm)
        if nm is not None:
            implied = 1.0 - nm[0] / nm[1]
            if self.sparsity is not None and abs(float(self.sparsity) - implied) > 1e-6:
                raise SeftError(
                    f"sparsity {self.sparsity} contradicts pattern {self.pattern} (which means {implied:g}); "
                    "leave --sparsity out or make them agree"
                )
            self.sparsity = implied
        elif self.sparsity is None:
            raise SeftError("unstructured pruning needs a sparsity in [0, 1), e.g. --sparsity 0.5")
        self.sparsity = check_sparsity(self.sparsity)
        for name in ("num_samples", "batch_size", "blocksize"):
            if int(getattr(self, name)) < 1:
                raise SeftError(f"{name} must be at least 1, got {getattr(self, name)}")
        if int(self.seq_len) < 2:
            raise SeftError(f"seq_len must be at least 2, got {self.seq_len}")
        if not 0 < float(self.percdamp) < 1:
            raise SeftError(f"percdamp must be in (0, 1), got {self.percdamp}")
        unknown = [t for t in self.targets if t not in TARGET_MODULES]
        if unknown or not self.targets:
            raise SeftError(f"unknown target module(s) {unknown or self.targets}; valid: {', '.join(TARGET_MODULES)}")
        parse_dtype(self.dtype)
        self.check_device()
        return self

    def check_device(self) -> torch.device:
        import torch

        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError):
            raise SeftError(f"invalid device {self.device!r}; valid: cpu, cuda, cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SeftError(f"device {self.device!r} requested but CUDA is not available; use --device cpu")
        return device

    @property
    def nm(self) -> Pattern:
        from ..sparsity import parse_pattern

        return parse_pattern(self.pattern)

    @property
    def needs_data(self) -> bool:
        return self.method not in DATA_FREE

    def as_dict(self) -> dict:
        return asdict(self)


# --- recipes ---------------------------------------------------------------------

RECIPE_KEYS = ["model", "output", "overwrite", "prune"]


@dataclass
class PruneJob:
    """A whole `seft prune` run: which model, where to, and the PruneConfig."""

    model: str
    output: str
    config: PruneConfig
    overwrite: bool = False

    def as_recipe(self) -> dict:
        return {"model": self.model, "output": self.output, "overwrite": self.overwrite,
                "prune": self.config.as_dict()}


def job_from_recipe(recipe: dict) -> PruneJob:
    """Validate a prune recipe (top-level keys model/output/overwrite/prune) into a PruneJob."""
    from ..recipe import build_dataclass, check_keys, top_level_bool

    check_keys(recipe, RECIPE_KEYS, "top level")
    for key in ("model", "output", "prune"):
        if recipe.get(key) in (None, ""):
            raise SeftError(f"prune recipe needs a '{key}' entry; top-level keys: {', '.join(RECIPE_KEYS)}")
    config = build_dataclass(PruneConfig, recipe["prune"], "prune").validate()
    return PruneJob(str(recipe["model"]), str(recipe["output"]), config, top_level_bool(recipe, "overwrite"))
