"""`import seft` is light, and an installed seft makes SEFT adapters load in interpreters that never import it
(issue 14, items 2 and 9).

Before: `import seft` imported peft (and with it torch and transformers: seconds), and a process that did not
`import seft` (stock `PeftModel.from_pretrained`, `lm_eval --model hf --model_args peft=...`) stopped at
`KeyError: 'SEFT'`. Now seft_peft_hook.pth (installed into site-packages by setup.py) puts a finder on
sys.meta_path that registers SEFT right after peft's own import (seft/_peft_hook.py).

Every check runs in a fresh interpreter (subprocess), as a user's would.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PTH = ROOT / "seft_peft_hook.pth"
HEAVY = ("torch", "peft", "transformers", "lm_eval", "datasets", "accelerate")


def _python(code: str, env: dict | None = None, check: bool = True, cwd: Path | None = None
            ) -> subprocess.CompletedProcess:
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         env=run_env, timeout=600, cwd=cwd)
    if check and out.returncode != 0:
        raise AssertionError(f"subprocess failed:\n{out.stdout}\n{out.stderr}")
    return out


def test_import_seft_loads_nothing_heavy():
    out = _python(f"""
        import json, sys
        import seft
        print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))
    """)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_lazy_names_still_work_and_register_seft():
    out = _python("""
        import seft
        assert seft.SeftConfig.__name__ == "SeftConfig" and seft.SeftCallback.__name__ == "SeftCallback"
        assert callable(seft.load_model) and seft.SeftError.__name__ == "SeftError" and "SeftConfig" in dir(seft)
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
        print(PEFT_TYPE_TO_CONFIG_MAPPING["SEFT"].__name__)
    """)
    assert out.stdout.strip().splitlines()[-1] == "SeftConfig"


@pytest.mark.parametrize("order", ["seft first", "peft first"])
def test_import_seft_registers_with_peft_either_order(order):
    imports = "import seft\nimport peft" if order == "seft first" else "import peft\nimport seft"
    out = _python(imports + """
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
print(PEFT_TYPE_TO_CONFIG_MAPPING["SEFT"].__name__, PEFT_TYPE_TO_TUNER_MAPPING["SEFT"].__name__)
""")
    assert out.stdout.strip().splitlines()[-1] == "SeftConfig SeftModel"


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A pruned tiny base, a SEFT adapter with nonzero values on it, an input and the in-process logits."""
    import peft
    import torch
    from conftest import TINY_VOCAB, build_tiny_model
    from test_tuner_helpers import batches, prune_tiny
    from transformers import AutoModelForCausalLM

    import seft

    root = tmp_path_factory.mktemp("hook")
    prune_tiny(build_tiny_model()).save_pretrained(root / "base")
    pm = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(root / "base"), seft.SeftConfig(lora_rank=2))
    with torch.no_grad():
        for layer in pm.base_model.seft_layers().values():
            layer.seft_values["default"].normal_(0, 0.05)
    pm.save_pretrained(root / "adapter")
    x = batches(TINY_VOCAB, 1, seed=4)[0]
    torch.save(x, root / "x.pt")
    with torch.no_grad():
        torch.save(pm.eval()(input_ids=x).logits, root / "ref.pt")
    return root


_STOCK_LOAD = """
    import sys
    {site}
    assert "torch" not in sys.modules and "seft.tuner" not in sys.modules  # nothing heavy at start-up
    import torch
    from transformers import AutoModelForCausalLM  # as lm-eval does: transformers (its peft check) first
    from peft import PeftModel
    root = {root!r}
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root + "/base"), root + "/adapter").eval()
    with torch.no_grad():
        diff = (pm(input_ids=torch.load(root + "/x.pt")).logits - torch.load(root + "/ref.pt")).abs().max()
    print("maxdiff", float(diff))
"""


def _site_dir_with_pth(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(PTH, site / PTH.name)
    return site


def test_pth_makes_stock_peft_load_seft_without_import_seft(adapter, tmp_path):
    """`site.addsitedir` is what Python's start-up does for site-packages: it runs the .pth line."""
    site = _site_dir_with_pth(tmp_path)
    out = _python(_STOCK_LOAD.format(site=f"import site; site.addsitedir({str(site)!r})", root=str(adapter)))
    assert out.stdout.strip().splitlines()[-1] == "maxdiff 0.0"


def test_without_the_pth_stock_peft_cannot_know_seft(adapter):
    """The control: the same script without the .pth is the reported failure, so the hook is what fixes it."""
    out = _python(_STOCK_LOAD.format(site="", root=str(adapter)), check=False)
    assert out.returncode != 0 and "KeyError: 'SEFT'" in out.stderr


def test_pth_hook_survives_an_availability_check(tmp_path):
    """`importlib.util.find_spec("peft")` (transformers' is_peft_available) must not use the hook up."""
    site = _site_dir_with_pth(tmp_path)
    out = _python(f"""
        import importlib.util, site, sys
        site.addsitedir({str(site)!r})
        assert importlib.util.find_spec("peft") is not None and "peft" not in sys.modules
        import peft
        from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
        print(PEFT_TYPE_TO_TUNER_MAPPING["SEFT"].__name__, type(peft.__loader__).__name__)
    """)
    assert out.stdout.strip().splitlines()[-1] == "SeftModel SourceFileLoader"


def test_pth_start_up_imports_only_the_hook(tmp_path):
    """Start-up cost: the .pth line imports seft's two tiny modules and nothing else."""
    site = _site_dir_with_pth(tmp_path)
    out = _python(f"""
        import sys
        before = set(sys.modules)
        import site; site.addsitedir({str(site)!r})
        print(sorted(set(sys.modules) - before))
    """)
    new = set(eval(out.stdout.strip().splitlines()[-1]))
    assert {"seft", "seft._peft_hook"} <= new
    assert new - {"seft", "seft._peft_hook", "__future__", "importlib.util", "importlib._abc", "importlib.machinery"} == set()


def _project_copy(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", PTH.name):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "seft", src / "seft", ignore=shutil.ignore_patterns("__pycache__"))
    return src


def test_editable_install_puts_the_pth_into_site_packages(tmp_path):
    """`pip install -e .` (the Makefile) installs the editable wheel setuptools builds: it must hold the .pth
    at its root (= site-packages), and installed, a fresh interpreter must learn SEFT at peft's import."""
    src = _project_copy(tmp_path)
    dist = tmp_path / "dist"
    wheels = []
    for hook in ("build_editable", "build_wheel"):  # what `pip install -e .` and `pip install .` ask setuptools
        build = subprocess.run(
            [sys.executable, "-c", f"import sys; from setuptools import build_meta; "
                                   f"print('WHEEL', build_meta.{hook}(sys.argv[1]))", str(dist)],
            cwd=src, capture_output=True, text=True, timeout=600)
        assert build.returncode == 0, build.stderr
        wheels.append(dist / next(ln for ln in build.stdout.splitlines() if ln.startswith("WHEEL ")).split()[1])
    editable = wheels[0]
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            assert zf.read(PTH.name).decode() == PTH.read_text(), wheel.name
    target = tmp_path / "target"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                          str(target), str(editable)], capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr
    assert (target / PTH.name).read_text() == PTH.read_text()
    out = _python(f"""
        import site, sys
        site.addsitedir({str(target)!r})
        assert "peft" not in sys.modules
        import peft
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
        print(PEFT_TYPE_TO_CONFIG_MAPPING["SEFT"].__module__, sys.modules["seft"].__file__)
    """, env={"PYTHONPATH": str(src)}, cwd=tmp_path)  # not the checkout: `python -c` puts the cwd first
    module, where = out.stdout.strip().splitlines()[-1].split()
    assert module == "seft.tuner.config" and where == str(src / "seft" / "__init__.py")
