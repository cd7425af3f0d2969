"""`seft eval --suite X/suite.yaml` must not load task YAMLs from X/tasks (issue 16, item 4).

lm-eval task files may carry `!function module.fn`, which imports
`module.py` from the task's folder: loading a folder runs its Python.
"""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

EVIL_TASK = """\
task: evil_task
custom_dataset: !function evil.load
test_split: test
output_type: multiple_choice
doc_to_text: "{{query}}"
doc_to_choice: "{{choices}}"
doc_to_target: gold
metric_list:
  - metric: acc
"""
EVIL_MODULE = """\
from pathlib import Path
Path(__file__).with_name("RAN").write_text("the task folder's Python ran")
def load(**_):
    import datasets
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([{"query": "q", "choices": ["a", "b"], "gold": 0}])})
"""


@pytest.fixture
def untrusted_suite(tmp_path) -> Path:
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "evil.yaml").write_text(EVIL_TASK)
    (tmp_path / "tasks" / "evil.py").write_text(EVIL_MODULE)
    (tmp_path / "suite.yaml").write_text("tasks: [evil_task]\n")
    return tmp_path


def test_task_next_to_a_suite_is_not_loaded(untrusted_suite, tmp_path, tiny_llama, tiny_tokenizer, capsys):
    from seft.cli import main

    base = tmp_path / "base"
    tiny_llama.save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    rc = main(["eval", "--model", str(base), "--suite", str(untrusted_suite / "suite.yaml"), "--limit", "1",
               "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "unknown task 'evil_task'" in err and "--include-path" in err
    assert not (untrusted_suite / "tasks" / "RAN").exists(), "a task file next to the suite ran Python"


def test_include_path_is_explicit(untrusted_suite):
    from seft.errors import SeftError
    from seft.eval_tasks import LOCAL_TASKS_DIR, include_paths

    assert include_paths() == [str(LOCAL_TASKS_DIR)]
    named = include_paths([str(untrusted_suite / "tasks")])
    assert named == [str(LOCAL_TASKS_DIR), str((untrusted_suite / "tasks").resolve())]
    with pytest.raises(SeftError, match="--include-path .* is not a folder"):
        include_paths([str(untrusted_suite / "nope")])
