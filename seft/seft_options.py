"""SeftConfig's fields (name, type, default, help) without importing peft, for the CLI's flags.

`seft finetune --help` lists one flag per SeftConfig field, generated from the
dataclass. Importing SeftConfig imports peft, transformers and torch (seconds),
which `--help` must not wait for, so the fields are read from the dataclass
definition in seft/tuner/config.py with `ast` (milliseconds). Should that
file take a shape this reader does not understand, it imports SeftConfig
instead: slower, never wrong. tests/test_cli_fast.py checks that both ways
give the same fields.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_SOURCE = Path(__file__).parent / "tuner" / "config.py"
CLASS_NAME = "SeftConfig"
# fields that record saved state rather than set anything (written by save_pretrained): no flag, no recipe key
RECORDS = ("removed_sizes",)


@dataclass(frozen=True)
class OptionField:
    name: str
    annotation: str  # as written, e.g. "int | None"
    default: Any
    help: str

    @property
    def kind(self) -> str:
        """'int', 'float', 'str' or 'list' (a list of strings, given comma-separated)."""
        parts = [p.strip() for p in self.annotation.split("|")]
        if any(p.startswith("list") for p in parts):
            return "list"
        for kind in ("bool", "int", "float", "str"):
            if kind in parts:
                return kind
        return "str"

    @property
    def optional(self) -> bool:
        return "None" in [p.strip() for p in self.annotation.split("|")]


def _from_source(path: Path = CONFIG_SOURCE) -> list[OptionField] | None:
    """The fields of `class SeftConfig` as written in `path`, or None if it is not in the expected shape."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError):
        return None
    cls = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == CLASS_NAME), None)
    if cls is None:
        return None
    out = []
    for node in cls.body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        value = node.value
        if not (isinstance(value, ast.Call) and getattr(value.func, "id", None) == "field"):
            return None
        kwargs = {k.arg: k.value for k in value.keywords}
        try:
            default = ast.literal_eval(kwargs["default"])
            meta = ast.literal_eval(kwargs["metadata"])
        except (KeyError, ValueError):
            return None
        out.append(OptionField(node.target.id, ast.unparse(node.annotation), default, str(meta.get("help", ""))))
    return out or None


def _from_class() -> list[OptionField]:
    """The same, from the imported dataclass (imports peft)."""
    from peft.config import PeftConfig

    from .tuner.config import SeftConfig

    inherited = {f.name for f in dataclasses.fields(PeftConfig)}
    return [OptionField(f.name, str(f.type), f.default, f.metadata.get("help", ""))
            for f in dataclasses.fields(SeftConfig) if f.init and f.name not in inherited]


@functools.cache
def seft_fields() -> tuple[OptionField, ...]:
    """SeftConfig's own fields a user sets, in definition order (RECORDS left out)."""
    return tuple(f for f in (_from_source() or _from_class()) if f.name not in RECORDS)
