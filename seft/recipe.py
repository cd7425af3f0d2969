"""YAML recipes <-> config dataclasses, strictly.

A recipe is a YAML mapping; `key.sub=value` overrides from the command line
are applied on top (the value parsed like YAML (`yaml_load`), so `0.5`, `true`,
`null`, `[a, b]` mean what they look like). `build_dataclass` turns one
section into a dataclass and refuses unknown keys with the section, the
key, close matches and every valid key, and values of the wrong type
(`sparsity: half`, `targets: q_proj` for a list) with the expected type — a typo in a recipe must never be
silently ignored after an hour of training.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import re
import types
import typing
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
    except UnicodeDecodeError as exc:
        raise SeftError(f"recipe {path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                        f"{exc.start}); save it as UTF-8") from None
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


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 -- an unresolvable annotation just means: no type check for that class
        return {}


def _describe(tp: Any) -> str | None:
    """'a number', 'an integer', ... for the types a recipe can check; None for any other type."""
    if tp is type(None):
        return "null"
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    origin = typing.get_origin(tp)
    if tp is dict or origin is dict:
        return "a mapping"
    if tp is list or origin is list:
        args = typing.get_args(tp)
        inner = _describe(args[0]) if args else "values"
        return None if inner is None else f"a list of {inner.removeprefix('a ').removeprefix('an ')}s"
    if origin in (typing.Union, types.UnionType):
        parts = [_describe(a) for a in typing.get_args(tp)]
        return None if any(p is None for p in parts) else " or ".join(parts)
    return None


_NO_MATCH = object()


def _coerce(tp: Any, value: Any) -> Any:
    """`value` fitted to the simple type `tp` (an integral float for an int, a number for a str), or _NO_MATCH."""
    if tp is type(None):
        return value if value is None else _NO_MATCH
    if tp is bool:
        return value if isinstance(value, bool) else _NO_MATCH
    if tp is int:
        if isinstance(value, bool):
            return _NO_MATCH
        if isinstance(value, int):
            return value
        return int(value) if isinstance(value, float) and value.is_integer() else _NO_MATCH
    if tp is float:
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else _NO_MATCH
    if tp is str:
        if isinstance(value, str):
            return value
        return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _NO_MATCH
    origin = typing.get_origin(tp)
    if tp is dict or origin is dict:
        return value if isinstance(value, dict) else _NO_MATCH
    if tp is list or origin is list:
        if not isinstance(value, list):
            return _NO_MATCH
        args = typing.get_args(tp)
        items = [_coerce(args[0], v) for v in value] if args else list(value)
        return _NO_MATCH if any(v is _NO_MATCH for v in items) else items
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(tp)
        # exact matches first, so `int | str` keeps 3 an int and `str | list[str]` keeps a list a list
        for member in sorted(members, key=lambda m: m is str):
            got = _coerce(member, value)
            if got is not _NO_MATCH:
                return got
        return _NO_MATCH
    return value


def check_types(cls: type, mapping: dict, section_name: str) -> dict:
    """`mapping` with each value checked against its dataclass field's type (SeftError on a mismatch).

    Only plain types are checked (bool, int, float, str, None, list[...],
    dict and unions of them); a field whose type mentions anything else (an
    enum, a class) is left to `cls` itself. An integral float is accepted for
    an int (`1e3` steps) and a number for a string; nothing else is converted.
    """
    hints = _field_types(cls)
    out = dict(mapping)
    for key, value in mapping.items():
        tp = hints.get(key)
        expected = _describe(tp) if tp is not None else None
        if expected is None:
            continue
        got = _coerce(tp, value)
        if got is _NO_MATCH:
            shown = f"the string {value!r}" if isinstance(value, str) else repr(value)
            raise SeftError(f"section '{section_name}': {key} must be {expected}, got {shown}")
        out[key] = got
    return out


def top_level_bool(recipe: dict, key: str, default: bool = False) -> bool:
    """A true/false top-level entry (`overwrite: "no"` must not read as true)."""
    value = recipe.get(key, default)
    if not isinstance(value, bool):
        raise SeftError(f"top level: {key} must be true or false, got {value!r}")
    return value


def build_dataclass(cls: type[T], mapping: dict | None, section_name: str) -> T:
    """`cls(**mapping)`, refusing unknown keys, values of the wrong type and non-mapping sections."""
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, dict):
        raise SeftError(f"section '{section_name}' must be a mapping of key: value, got {mapping!r}")
    valid = [f.name for f in dataclasses.fields(cls) if f.init]
    check_keys(mapping, valid, section_name)
    mapping = check_types(cls, mapping, section_name)
    try:
        return cls(**mapping)
    except TypeError as exc:
        raise SeftError(f"section '{section_name}': {exc}") from None


def dump_recipe(recipe: dict) -> str:
    """YAML text of a resolved recipe, keys in their given order."""
    return yaml.safe_dump(recipe, sort_keys=False, default_flow_style=False)
