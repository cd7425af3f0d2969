"""SeftCallback inside a stock transformers.Trainer (tiny model), and the SmolLM2 integration run."""
from __future__ import annotations

import logging
import time

import peft
import pytest
import torch
from conftest import TINY_VOCAB, build_tiny_model
from test_tuner_helpers import proj_weights, prune_tiny

import seft

logger = logging.getLogger(__name__)


class _Blocks(torch.utils.data.Dataset):
    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def _trainer(pm, blocks, out_dir, steps, bsz, accum=1, lr=1e-2, **kw):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=bsz, gradient_accumulation_steps=accum,
        learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1000, save_strategy="no",
        report_to=[], use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True, **kw,
    )
    callback = seft.SeftCallback()
    return Trainer(model=pm, args=args, train_dataset=_Blocks(blocks), callbacks=[callback]), callback


def test_callback_drives_trainer_with_accumulation(tmp_path):
    model = prune_tiny(build_tiny_model())
    pm = peft.get_peft_model(model, seft.SeftConfig(lora_rank=2, update_interval=3, stat_window=2,
                                                    evolve_until=1.0, revive_fraction=0.5))
    blocks = torch.randint(3, TINY_VOCAB, (64, 24), generator=torch.Generator().manual_seed(0))
    trainer, callback = _trainer(pm, blocks, tmp_path, steps=7, bsz=4, accum=2)
    trainer.train()
    assert [h["step"] for h in callback.history] == [3, 6]
    assert callback.history[0]["seft/replaced"] > 0
    logged = [h for h in trainer.state.log_history if "seft/replaced" in h]
    assert [h["step"] for h in logged] == [3, 6]
    report = pm.seft_sparsity_report()
    assert report["active"] == report["n"]


def test_callback_rejects_unsupported_optimizer(tmp_path):
    pm = peft.get_peft_model(prune_tiny(build_tiny_model()), seft.SeftConfig(lora_rank=2))
    blocks = torch.randint(3, TINY_VOCAB, (8, 24))
    trainer, _ = _trainer(pm, blocks, tmp_path, steps=1, bsz=4, optim="sgd")
    # Trainer's "sgd" has no momentum by default -> stateless, allowed; RMSprop is not
    trainer.create_optimizer()
    trainer.optimizer = torch.optim.RMSprop([p for p in pm.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(seft.SeftError, match="cannot re-seed"):
        trainer.train()


@pytest.mark.slow
def test_smollm2_wanda50_seft_repairs(smollm2_wanda50, tmp_path):
    """Wanda-50% SmolLM2 -> SEFT (LoRA r=8 budget), 40 Trainer steps on wiki -> lower held-out ppl."""
    from transformers import AutoModelForCausalLM

    from seft.data import packed_blocks
    from seft.models import load_model
    from seft.perplexity import perplexity

    torch.manual_seed(0)
    t_start = time.perf_counter()
    model, tok = load_model(smollm2_wanda50)
    before = {n: int((w != 0).sum()) for n, w in proj_weights(model).items()}
    pruned = perplexity(model, tok, "wiki", seq_len=256, max_windows=32, progress=False)
    print(f"\nSEFT-INTEGRATION pruned ppl {pruned.perplexity:.3f} in {pruned.seconds:.1f}s", flush=True)
    # revival on (off by default since the repair study): the revive + re-prune path must hold the budget at scale
    pm = peft.get_peft_model(model, seft.SeftConfig(lora_rank=8, update_interval=10, stat_window=3,
                                                    evolve_until=0.75, revive_fraction=0.1))
    blocks = packed_blocks(tok, "wiki", 128, "train")
    steps = 40
    trainer, callback = _trainer(pm, blocks, tmp_path / "run", steps=steps, bsz=2, lr=2e-3)
    t0 = time.perf_counter()
    trainer.train()
    per_step = (time.perf_counter() - t0) / steps
    repaired = perplexity(pm, tok, "wiki", seq_len=256, max_windows=32, progress=False)
    hist = callback.history
    totals = {k: sum(h[f"seft/{k}"] for h in hist) for k in ("replaced", "revived", "repruned", "restored")}
    logger.warning("SEFT integration: pruned ppl %.3f -> SEFT ppl %.3f; %d steps, %.2f s/step; updates %s; "
                   "totals %s", pruned.perplexity, repaired.perplexity, steps, per_step, len(hist), totals)
    print(f"\nSEFT-INTEGRATION pruned={pruned.perplexity:.3f} seft={repaired.perplexity:.3f} "
          f"steps={steps} s_per_step={per_step:.2f} updates={len(hist)} totals={totals} "
          f"sparsity={pm.seft_sparsity_report()['sparsity']:.5f} total_s={time.perf_counter() - t_start:.0f}")
    assert repaired.perplexity < pruned.perplexity
    assert totals["replaced"] > 0 and totals["revived"] > 0 and totals["repruned"] > 0
    merged = pm.merge_and_unload()
    after = {n: int((w != 0).sum()) for n, w in proj_weights(merged).items()}
    assert after == before
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert {n: int((w != 0).sum()) for n, w in proj_weights(reloaded).items()} == before
    print(f"SEFT-INTEGRATION merged nonzeros={sum(after.values())} before={sum(before.values())}")
