"""Worker for tests/test_ddp.py: train a tiny SEFT model with DDP (gloo, CPU).

Run by torch.multiprocessing from the test, or alone with world_size 1. Every
rank sees its share of the same global batch; the result (topology and
values) is saved per rank for the test to compare.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))


def make_model():
    from conftest import build_tiny_model

    from seft.models import decoder_layers, target_linears
    from seft.sparsity import row_topk_mask

    model = build_tiny_model("llama", seed=3)
    with torch.no_grad():
        for layer in decoder_layers(model):
            for lin in target_linears(layer).values():
                lin.weight.mul_(row_topk_mask(lin.weight.abs(), 0.5))
    return model


def global_batches(steps: int, global_batch: int, seq_len: int, vocab: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(123)
    return torch.randint(3, vocab, (steps, global_batch, seq_len), generator=gen)


def train(rank: int, world_size: int, out_dir: str, port: int, steps: int = 13, growth: str = "gradient") -> None:
    import peft

    import seft

    torch.manual_seed(0)
    if world_size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    model = peft.get_peft_model(make_model(), seft.SeftConfig(lora_rank=2, update_interval=3, stat_window=2,
                                                               revive_fraction=0.5, regrow_warmup=2,
                                                               growth=growth))
    seft_model = model.base_model
    wrapped = model
    if world_size > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-2, weight_decay=0.0)
    data = global_batches(steps, 4, 16, model.config.vocab_size)
    per_rank = 4 // world_size
    history = []
    for step in range(1, steps + 1):
        batch = data[step - 1, rank * per_rank:(rank + 1) * per_rank]
        seft_model.seft_begin_window(step, steps)
        loss = wrapped(input_ids=batch, labels=batch).loss
        loss.backward()
        seft_model.seft_pre_optimizer_step(opt)
        opt.step()
        seft_model.seft_post_optimizer_step(opt)
        opt.zero_grad()
        stats = seft_model.seft_update(step, steps, opt)
        if stats:
            history.append(stats)
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if "seft_" in k}
    torch.save({"state": state, "history": history}, os.path.join(out_dir, f"rank{rank}_of{world_size}.pt"))
    if world_size > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    train(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
