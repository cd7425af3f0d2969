"""YAML recipes <-> config dataclasses, strictly.

A recipe is a YAML mapping; `key.sub=value` overrides from the command line
are applied on top (the value parsed like YAML (`yaml_load`), so `0.5`, `true`,
`null`, `[a, b]` mean what they look like). `build_dataclass` turns one
section into a dataclass and refuses unknown keys with the section, the
key, close matches and every valid key — a typo in a recipe must never be
silently ignored after an hour of training.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import SeftError

T = TypeVar("T")


class RecipeLoader(yaml.SafeLoader):
    """safe_load with YAML 1.2 numbers: `2:4` stays a string (YAML 1.1 reads it
    as the base-60 integer 124) and `1e-4` is a float (1.1 wants `1.0e-4`)."""


_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RecipeLoader.add_implicit_resolver(_INT, re.compile(r"^[-+]?(?:0|[1-9][0-9_]*|0x[0-9a-fA-F_]+|0b[01_]+)$"),
                                   list("-+0123456789"))
RecipeLoader.add_implicit_resolver(
    _FLOAT,
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)?\.[0-9_]*(?:[eE][-+]?[0-9]+)?$|^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"
               r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    """`yaml.safe_load` with the YAML 1.2 number rules of `RecipeLoader`."""
    return yaml.load(text, Loader=RecipeLoader)  # noqa: S506  (a SafeLoader subclass)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'prune.sparsity=0.6' -> (['prune', 'sparsity'], 0.6)."""
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not key.strip() or any(not p for p in parts):
        raise SeftError(f"bad override {text!r}; expected KEY=VALUE or SECTION.KEY=VALUE, e.g. prune.sparsity=0.6")
    try:
        value = yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise SeftError(f"bad override {text!r}: value is not valid YAML ({str(exc).splitlines()[0]})") from None
    return parts, value


def apply_override(recipe: dict, text: str) -> None:
    """Set a (possibly nested) key in place; intermediate sections are created if missing."""
    parts, value = parse_override(text)
    node = recipe
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SeftError(f"bad override {text!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> dict:
    """The recipe at `path` as a dict, with `overrides` applied."""
    path = Path(path)
    if not path.is_file():
        raise SeftError(f"recipe {path} not found" + ("" if path.suffix in (".yaml", ".yml") else " (expected a .yaml file)"))
    try:
        recipe = yaml_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SeftError(f"recipe {path}{where} is not valid YAML: {problem}") from None
    if recipe is None:
        recipe = {}
    if not isinstance(recipe, dict):
        raise SeftError(f"recipe {path} must be a YAML mapping of sections, got a {type(recipe).__name__}")
    for text in overrides or []:
        apply_override(recipe, text)
    return recipe


def unknown_key_error(section: str, key: str, valid: list[str]) -> SeftError:
    close = difflib.get_close_matches(str(key), valid, n=3, cutoff=0.5)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    return SeftError(f"unknown key {key!r} in section '{section}'{hint}; valid keys: {', '.join(valid)}")


def check_keys(mapping: dict, valid: list[str], section: str) -> None:
    """Strictness for plain sections (no dataclass): every key must be in `valid`."""
    for key in mapping:
        if key not in valid:
            raise unknown_key_error(section, key, valid)


def build_dataclass(cls: type[T], mapping: dict | None, section_name: str) -> T:
    """`cls(**mapping)`, refusing unknown keys and non-mapping sections with a SeftError."""
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, dict):
        raise SeftError(f"section '{section_name}' must be a mapping of key: value, got {mapping!r}")
    valid = [f.name for f in dataclasses.fields(cls) if f.init]
    check_keys(mapping, valid, section_name)
    try:
        return cls(**mapping)
    except TypeError as exc:
        raise SeftError(f"section '{section_name}': {exc}") from None


def dump_recipe(recipe: dict) -> str:
    """YAML text of a resolved recipe, keys in their given order."""
    return yaml.safe_dump(recipe, sort_keys=False, default_flow_style=False)
