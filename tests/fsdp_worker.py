"""Worker for tests/test_fsdp.py: train a tiny SEFT model under FSDP2 `fully_shard` (gloo, CPU).

Run by torch.multiprocessing from the test (2 ranks), or alone with world
size 1, which trains the same model unsharded on the whole global batch (the
reference). Each rank writes the whole SEFT state it ends with (sharded
`values` gathered), its base weights, the adapter saved with
`seft.distributed.save_pretrained`, and the model merged with
`merge_and_unload` and saved the same way.

`train_trainer` does the same through a stock Trainer + SeftCallback.
accelerate runs FSDP on accelerators only (on CPU its FSDP plugin gives way
to DDP), so there the model is sharded by `shard_for_seft` first and handed
to Trainer as transformers' own FSDP2 loading does (`from_pretrained(...,
distributed_config=...)` sets the flag that tells Trainer the model already
owns its sharding and gradient reduction).
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

CONFIG = dict(lora_rank=2, update_interval=3, stat_window=2, revive_fraction=0.5, regrow_warmup=2)


def train(rank: int, world_size: int, out_dir: str, port: int, steps: int = 13, kernel: str = "auto") -> None:
    import peft
    from ddp_worker import global_batches, make_model

    import seft
    from seft.distributed import full_state_dict, save_pretrained, shard_for_seft

    torch.manual_seed(0)
    if world_size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    model = peft.get_peft_model(make_model(), seft.SeftConfig(kernel=kernel, **CONFIG))
    seft_model = model.base_model
    if world_size > 1:
        shard_for_seft(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-2, weight_decay=0.0)
    data = global_batches(steps, 4, 16, model.config.vocab_size)
    per_rank = 4 // world_size
    history = []
    for step in range(1, steps + 1):
        batch = data[step - 1, rank * per_rank:(rank + 1) * per_rank]
        seft_model.seft_begin_window(step, steps)
        model(input_ids=batch, labels=batch).loss.backward()
        seft_model.seft_pre_optimizer_step(opt)
        opt.step()
        seft_model.seft_post_optimizer_step(opt)
        opt.zero_grad()
        stats = seft_model.seft_update(step, steps, opt)
        if stats:
            history.append(stats)
    state = full_state_dict(model)
    seft_state = {k: v for k, v in state.items() if "seft_" in k}
    base = {k: v for k, v in state.items() if "seft_" not in k}
    tag = f"of{world_size}"
    save_pretrained(model, os.path.join(out_dir, f"adapter_{tag}"))
    merged = model.merge_and_unload()
    save_pretrained(merged, os.path.join(out_dir, f"merged_{tag}"))
    torch.save({"state": seft_state, "base": base, "history": history},
               os.path.join(out_dir, f"rank{rank}_{tag}.pt"))
    if world_size > 1:
        torch.distributed.destroy_process_group()


class Blocks(torch.utils.data.Dataset):
    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def train_trainer(rank: int, world_size: int, out_dir: str, port: int, steps: int = 12) -> None:
    """Trainer + SeftCallback; per-device batch 4 / world_size in order, so each step sees one global batch."""
    import peft
    from ddp_worker import global_batches, make_model
    from transformers import Trainer, TrainingArguments

    import seft
    from seft.distributed import shard_for_seft

    if world_size > 1:
        from accelerate.state import AcceleratorState, GradientState

        # a forked rank inherits the parent's (1-process) accelerate singletons: start from none
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    torch.manual_seed(0)
    model = peft.get_peft_model(make_model(), seft.SeftConfig(**CONFIG))
    args = TrainingArguments(
        output_dir=os.path.join(out_dir, f"trainer_of{world_size}"), max_steps=steps,
        per_device_train_batch_size=4 // world_size, train_sampling_strategy="sequential", learning_rate=2e-2,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, logging_steps=1000, save_strategy="no",
        report_to=[], use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )
    if world_size > 1:
        import torch.distributed as dist

        assert dist.is_initialized() and dist.get_world_size() == world_size
        shard_for_seft(model)
        model.get_base_model()._is_distributed_loading_by_transformers = True
    blocks = global_batches(steps, 4, 16, model.config.vocab_size).reshape(-1, 16)
    callback = seft.SeftCallback()
    trainer = Trainer(model=model, args=args, train_dataset=Blocks(blocks), callbacks=[callback])
    trainer.train()
    trainer.save_model(os.path.join(out_dir, f"trainer_adapter_of{world_size}"))
    torch.save({"history": callback.history}, os.path.join(out_dir, f"trainer_rank{rank}_of{world_size}.pt"))


if __name__ == "__main__":
    train(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
