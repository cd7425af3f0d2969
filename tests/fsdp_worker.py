"""Worker for tests/test_fsdp.py: train a tiny SEFT model under FSDP2 `fully_shard` (gloo, CPU).

Run by torch.multiprocessing from the test (2 ranks), or alone with world
size 1, which trains the same model unsharded on the whole global batch (the
reference). Each rank writes the whole SEFT state it ends with (sharded
`values` gathered), its base weights, the adapter saved with
`seft.distributed.save_pretrained`, and the model merged with
`merge_and_unload` and saved the same way.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

CONFIG = dict(lora_rank=2, update_interval=3, stat_window=2, revive_fraction=0.5, regrow_warmup=2)


def train(rank: int, world_size: int, out_dir: str, port: int, steps: int = 12, kernel: str = "auto") -> None:
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


if __name__ == "__main__":
    train(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
