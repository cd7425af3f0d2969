"""Recipes: strict loading, overrides, and every file in recipes/ validates."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from seft.cli import main
from seft.commands.validate import resolve
from seft.errors import SeftError
from seft.recipe import apply_override, build_dataclass, load_recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


@dataclass
class Section:
    alpha: float = 1.0
    name: str = "x"


def test_recipes_exist():
    assert any(p.name.startswith("prune_") for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_validates_and_names_its_launch_command(path):
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("#") and "seft " in first and path.name in first
    kind, resolved = resolve(load_recipe(path))
    assert kind in ("prune", "finetune") and resolved


def test_validate_command_prints_resolved(capsys):
    path = next(p for p in RECIPES if p.name.startswith("prune_"))
    assert main(["validate", str(path), "prune.sparsity=0.5", "prune.pattern=unstructured"]) == 0
    out = capsys.readouterr().out
    assert "valid prune recipe" in out and "percdamp: 0.01" in out


def test_overrides_are_yaml_typed():
    recipe = {"prune": {"sparsity": 0.5}}
    for text in ("prune.sparsity=0.7", "prune.pattern=2:4", "overwrite=true", "prune.dtype=null", "new.a.b=[1, 2]"):
        apply_override(recipe, text)
    assert recipe == {"prune": {"sparsity": 0.7, "pattern": "2:4", "dtype": None}, "overwrite": True,
                      "new": {"a": {"b": [1, 2]}}}


@pytest.mark.parametrize("text", ["sparsity", "=3", "a..b=1", "prune.x=[1,"])
def test_bad_override(text):
    with pytest.raises(SeftError, match="bad override"):
        apply_override({}, text)


def test_override_into_a_value_is_refused():
    with pytest.raises(SeftError, match="model is a value, not a section"):
        apply_override({"model": "m"}, "model.x=1")


def test_missing_and_bad_yaml(tmp_path):
    with pytest.raises(SeftError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("prune:\n  method: [wanda\n")
    with pytest.raises(SeftError, match=r"bad.yaml:\d+ is not valid YAML"):
        load_recipe(bad)
    scalar = tmp_path / "s.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(SeftError, match="must be a YAML mapping"):
        load_recipe(scalar)


def test_build_dataclass_is_strict():
    assert build_dataclass(Section, {"alpha": 2.0}, "sec") == Section(alpha=2.0)
    with pytest.raises(SeftError, match=r"unknown key 'alpah' in section 'sec' \(did you mean alpha\?\); "
                                        r"valid keys: alpha, name"):
        build_dataclass(Section, {"alpah": 2.0}, "sec")
    with pytest.raises(SeftError, match="section 'sec' must be a mapping"):
        build_dataclass(Section, [1, 2], "sec")


def test_prune_recipe_errors(tmp_path):
    with pytest.raises(SeftError, match=r"unknown key 'ouput' in section 'top level'.*did you mean output"):
        resolve({"model": "m", "ouput": "o", "prune": {}})
    with pytest.raises(SeftError, match="needs a 'output' entry"):
        resolve({"model": "m", "prune": {"method": "wanda"}})
    with pytest.raises(SeftError, match="cannot tell what this recipe is for"):
        resolve({"model": "m"})
    with pytest.raises(SeftError, match="unknown pruning method"):
        resolve({"model": "m", "output": "o", "prune": {"method": "sgpt"}})
