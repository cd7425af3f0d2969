"""The `seft` model type for lm-eval-harness: base model + optional peft adapter.

    python -m seft.lm_eval_cli run --model seft \
        --model_args pretrained=smollm2-135m,adapter=out/adapter,dtype=float32 \
        --include_path eval/tasks --tasks bb_general_knowledge,wiki_heldout_rolling

It is lm-eval's own `HFLM` (same batching, same scoring) over a model that
`seft.evaluate.load_for_eval` built: seft aliases resolve, the adapter is
checked against the base before peft loads it, and SEFT adapters work
because importing seft registers the SEFT peft type. `merge=True` scores the
merged model instead.

lm-eval finds model types only in its registry and has no plugin entry
point, so this module must be imported before lm-eval looks the name up:
`python -m seft.lm_eval_cli` does that and then runs lm-eval's CLI unchanged;
in Python, `import seft.lm_eval_model` before `lm_eval.simple_evaluate(model="seft", ...)`.
"""
from __future__ import annotations

from typing import Any

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from .evaluate import load_for_eval


def _as_bool(value: Any) -> bool:
    return str(value).lower() in {"1", "true", "yes", "on"}


@register_model("seft", "hf-seft")
class SeftLM(HFLM):
    """HFLM over `load_for_eval(pretrained, adapter, dtype, device, merge)`."""

    def __init__(
        self,
        pretrained: str,
        adapter: str | None = None,
        dtype: str | None = None,
        device: str | None = None,
        merge: bool | str = False,
        batch_size: int | str = 1,
        **kwargs: Any,
    ) -> None:
        loaded = load_for_eval(pretrained, adapter, dtype=None if dtype in (None, "auto") else dtype,
                               device=device, merge=_as_bool(merge))
        self.seft_meta = loaded.meta
        super().__init__(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size, **kwargs)
