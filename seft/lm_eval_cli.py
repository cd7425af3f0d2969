"""lm-eval-harness's own command line, with seft's model type registered.

    python -m seft.lm_eval_cli run --model seft \
        --model_args pretrained=BASE,adapter=ADAPTER_DIR \
        --include_path eval/tasks --tasks bb_general_knowledge

Every argument goes to lm-eval unchanged (`python -m seft.lm_eval_cli --help`
is lm-eval's help). The only difference from the `lm_eval` executable is
that seft is imported first: lm-eval has no plugin entry point for model
types, and peft can read a SEFT adapter's config only once seft has
registered the SEFT type. With it imported, lm-eval's stock `hf` model also
takes SEFT adapters: `--model hf --model_args pretrained=DIR,peft=ADAPTER_DIR`.
"""
from __future__ import annotations

import sys


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    import seft.lm_eval_model  # noqa: F401  (imports seft: the SEFT peft type; registers --model seft / hf-seft)

    sys.argv[0] = "lm_eval"
    cli_evaluate()


if __name__ == "__main__":
    main()
