"""SeftConfig: the SEFT adapter's settings (a peft `PeftConfig`, saved as adapter_config.json).

Budget: give `density` (fraction of each targeted weight, in (0, 1]) *or*
`lora_rank` (k = r * (in + out) per layer, the parameter count of a LoRA of
rank r, for equal-budget comparisons). Neither given -> `lora_rank = 8`.
The budget must fit in each layer's active positions (initial slots sit on
active weights, without duplicates); a layer where it does not is an error.

Naming: the statistics window is `stat_window` (optimizer steps observed
before each update). It is deliberately *not* called "accumulation steps",
to stay distinct from the Trainer's `gradient_accumulation_steps`; with
gradient accumulation every micro-batch of those steps counts.

`removed_sizes` is not a setting but a record of the saved state: per layer,
the length of `seft_removed` (the only state tensor whose length changes with
the topology), written at every save. Loaders that size buffers before they
copy (transformers' `from_pretrained(adapter_dir)` / `load_adapter` /
`pipeline`, which compare shapes and never call `load_state_dict`) need it;
see layer.py for how a config carrying it builds placeholders.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from peft.config import PeftConfig
from peft.utils.peft_types import PeftType

from ..errors import SeftError, choices_hint
from .sparse_ops import KERNELS
from .topology import (
    BALANCES,
    DROP_SCORES,
    DROP_VALUES,
    GROWTHS,
    INITS,
    REGROW_MOMENTS,
    SCHEDULES,
    SENSITIVITIES,
    SLOT_LRS,
)

DEFAULT_LORA_RANK = 8
PEFT_NAME = "SEFT"


def _extend_peft_type(name: str) -> PeftType:
    """Add `name` to peft's closed `PeftType` enum (peft has no public hook for this).

    `register_peft_method` insists the type be a `PeftType` member, and the
    enum is a `str` subclass, so a member built here compares and hashes like
    the string "SEFT" — which is what adapter_config.json stores.
    """
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


SEFT_PEFT_TYPE = _extend_peft_type(PEFT_NAME)


@dataclass
class SeftConfig(PeftConfig):
    """Settings of a SEFT adapter (DESIGN.md §1).

    Defaults follow the spec except five that the repair study set
    (benchmarks/results/repair_study.md, Wanda 70%, 3 seeds): replace 10% of the
    slots at the first update instead of 30%, no revival, regrown slots
    protected for one update, SMET's density-aware lr, row-balanced swaps. The
    spec's values stay reachable (0.3, 0.1, 0, "plain", "none").
    """

    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Linear names or regex; None = q,k,v,o,gate,up,down for LLaMA/Mistral."})
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Names or regex to skip."})
    density: float | None = field(default=None, metadata={"help": "k = density * out * in per layer, in (0, 1]."})
    lora_rank: int | None = field(default=None, metadata={"help": "k = lora_rank * (in + out); default 8."})
    update_interval: int = field(default=20, metadata={"help": "Optimizer steps between topology updates."})
    stat_window: int = field(default=4, metadata={"help": "Optimizer steps of gradient statistics per update."})
    initial_replace_fraction: float = field(default=0.1, metadata={"help": "p0 of the replace schedule."})
    schedule: str = field(default="cosine", metadata={"help": "cosine | linear decay of the replace fraction."})
    evolve_until: float = field(default=0.75, metadata={"help": "Topology updates only before step evolve_until * total_steps."})
    revive_fraction: float = field(default=0.0, metadata={
        "help": "Max share of grown slots at pruned positions (0 = no revival, the default: revival cost ~3% "
                "held-out ppl in the repair study)."})
    sensitivity: str = field(default="taylor", metadata={"help": "taylor (|w g|) | magnitude (|w|) re-prune score."})
    growth: str = field(default="gradient", metadata={
        "help": "gradient (|g|) | normalized (|g| / rms of the input channel, the diagonal Gauss-Newton gain) "
                "grow score."})
    regrow_warmup: int = field(default=10, metadata={"help": "Steps over which a regrown slot's update ramps up."})
    protect_updates: int = field(default=1, metadata={
        "help": "A regrown slot is dropped only after all others at the next N topology updates (0 = off; "
                "1 stops the churn of young slots: the repair study)."})
    init: str = field(default="random", metadata={
        "help": "random | reselect: initial slots at random active positions; reselect re-chooses all k by "
                "window |g| after the first stat_window steps (slots already there keep their values)."})
    regrow_moments: str = field(default="seeded", metadata={
        "help": "seeded (Adam moments of a regrown slot from its window statistics) | zero (the cold start)."})
    drop_values: str = field(default="discard", metadata={
        "help": "discard | fold: what a drop does with the slot's learned value (fold adds it to the base weight, "
                "so the position keeps it; study option)."})
    drop_score: str = field(default="value", metadata={
        "help": "value | momentum: drop the slots with the smallest |value| or the smallest |Adam exp_avg| "
                "(the least recently useful; study option)."})
    slot_lr: str = field(default="density", metadata={
        "help": "plain | channel | density: every slot steps by lr (Adam); or by lr * (RMS of its input channel "
                "/ mean RMS) ** slot_lr_power, clipped to [0.01, 4]; or by lr * a per-layer factor proportional "
                "to out / k (SMET's density-aware lr; k-weighted mean 1; the default, set by the repair study)."})
    slot_lr_power: float = field(default=-1.0, metadata={
        "help": "With slot_lr: channel, the power of the channel-RMS factor (-1 = Adam in Wanda-normalized "
                "coordinates: the same output step on every channel; > 0 = larger steps on loud channels)."})
    balance: str = field(default="row", metadata={
        "help": "none | row: row keeps every output row's slot count at each update (drops and grows pair up "
                "within rows; the default, set by the repair study)."})
    candidates: int | None = field(default=None, metadata={"help": "Window candidates per kind; None = k."})
    seed: int = field(default=0, metadata={"help": "Seed of the initial slot draw."})
    kernel: str = field(default="auto", metadata={
        "help": "auto | sparse | dense: grad(values) by a sampled product outside statistics windows (and CSR "
                "products for a 4-bit base's delta), or the dense weight gradient + gather; auto = sparse on "
                "CPU up to 10% density, dense on accelerators (measured in benchmarks/train_speed.py)."})

    removed_sizes: dict[str, int] | None = field(default=None, metadata={
        "help": "Written at save: {layer: len(seft_removed)} of the saved state (None = a new adapter). A config "
                "carrying it builds placeholder state that must be loaded before use."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = SEFT_PEFT_TYPE
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        self.validate()

    def validate(self) -> None:
        """Raise SeftError (one line, naming the valid range) for any bad field."""
        if self.density is not None and self.lora_rank is not None:
            raise SeftError("give either density or lora_rank for the SEFT budget, not both")
        if self.density is not None and not 0.0 < float(self.density) <= 1.0:
            raise SeftError(f"density must be in (0, 1], got {self.density}")
        if self.lora_rank is not None and int(self.lora_rank) < 1:
            raise SeftError(f"lora_rank must be a positive integer, got {self.lora_rank}")
        for name in ("update_interval", "stat_window"):
            if int(getattr(self, name)) < 1:
                raise SeftError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.stat_window > self.update_interval:
            raise SeftError(f"stat_window ({self.stat_window}) must be <= update_interval ({self.update_interval})")
        for name in ("initial_replace_fraction", "revive_fraction", "evolve_until"):
            value = float(getattr(self, name))
            if not 0.0 <= value <= 1.0:
                raise SeftError(f"{name} must be in [0, 1], got {value}")
        for name, valid in (("schedule", SCHEDULES), ("sensitivity", SENSITIVITIES), ("growth", GROWTHS),
                            ("kernel", KERNELS), ("init", INITS), ("regrow_moments", REGROW_MOMENTS),
                            ("drop_values", DROP_VALUES), ("drop_score", DROP_SCORES), ("slot_lr", SLOT_LRS),
                            ("balance", BALANCES)):
            value = getattr(self, name)
            if value not in valid:
                raise SeftError(f"unknown {name} {value!r}; {choices_hint(value, valid)}")
        for name in ("regrow_warmup", "protect_updates"):
            if int(getattr(self, name)) < 0:
                raise SeftError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.candidates is not None and int(self.candidates) < 1:
            raise SeftError(f"candidates must be >= 1 or None, got {self.candidates}")
        if self.removed_sizes is not None:
            if not isinstance(self.removed_sizes, dict) or not all(
                    isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
                    for k, v in self.removed_sizes.items()):
                raise SeftError("removed_sizes must map layer names to counts >= 0 (it is written at save; "
                                "set it to None for a new adapter)")

    def record_saved_state(self, sizes: dict[str, int]) -> None:
        """Sizes of the state about to be saved; written by the next `save_pretrained` (the adapter's save
        computes the state dict, then saves this config)."""
        self._saved_removed_sizes = dict(sizes)

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """peft's save, with `removed_sizes` of the state saved alongside (see `record_saved_state`).

        The live config keeps its own `removed_sizes` (None for a new adapter), so the same object can
        still build a new adapter after a save."""
        recorded = getattr(self, "_saved_removed_sizes", None)
        if recorded is None:
            return super().save_pretrained(save_directory, **kwargs)
        own, self.removed_sizes = self.removed_sizes, recorded
        try:
            return super().save_pretrained(save_directory, **kwargs)
        finally:
            self.removed_sizes = own

    def age_cap(self) -> int:
        """Slot ages saturate here: past the warm-up, the drop protection and one interval (the churn statistic:
        a slot grown at an update is `update_interval` old at the next one)."""
        return max(int(self.regrow_warmup), max(int(self.protect_updates), 1) * int(self.update_interval) + 1)

    def budget(self, out_features: int, in_features: int) -> int:
        """k for one `out x in` layer."""
        if self.density is not None:
            return max(1, int(round(float(self.density) * out_features * in_features)))
        rank = DEFAULT_LORA_RANK if self.lora_rank is None else int(self.lora_rank)
        return rank * (in_features + out_features)
