"""`seft finetune`: repair a pruned model on a stock `transformers.Trainer`.

One run = load the pruned model -> wrap it for the chosen method -> train
with `Trainer` (+ `SeftCallback` for the SEFT methods) -> write the adapter,
optionally the merged sparse model, and `train_report.json`.

Methods (same data, steps and trainable-parameter budget `adapter.lora_rank`):
  seft           SEFT with SeftConfig's defaults (DESIGN.md §1, five of them set
                 by benchmarks/results/repair_study.md)
  seft-norevive  SEFT with revival forced off (`revive_fraction = 0`, the
                 default now; the method overrides an adapter config that sets it)
  static         the SEFT delta with evolution off (fixed random slots)
  masked-lora    LoRA times the base mask (SQFT-style), merged sparse
  lora-reprune   dense LoRA, merged, re-pruned by Wanda to the base sparsity (LoRA*)
  lora-mask      dense LoRA, merged, original mask re-applied
  full-masked    every target weight trained, mask re-applied after each step
  lora           plain dense LoRA (peft), no mask: for a dense model (the dense +
                 LoRA ceiling of a benchmark); makes no sparsity promise, so its
                 merge is not checked against the base's sparsity

Where things go, and why:
  OUTPUT/                      written atomically at the end (temp folder + rename)
    adapter_model.safetensors  + adapter_config.json (peft methods)
    merged/                    plain HF checkpoint (--merge; always for the
                               methods whose product only exists merged)
    train_report.json          steps, time, memory, topology per update, sparsity
    runs/                      TensorBoard event files (train.report_to: tensorboard;
                               in .OUTPUT.work/runs while training)
  .OUTPUT.work/                Trainer checkpoints while training; `--resume`
                               continues from its newest complete checkpoint
                               (adapter with its topology + optimizer + RNG + data
                               position; checkpoints.py tells half-written ones);
                               removed after a successful run.

Invariants that fail the run instead of writing a wrong output (train_guards.py):
a non-finite loss or trained value stops training; non-finite state is never
saved or merged; a merged model not exactly as sparse as the base is refused
(every method but `lora`, which is dense by design).
"""
from __future__ import annotations

import logging
import math
import os
import resource
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from .baselines import base_masks
from .errors import SeftError
from .finetune_config import (  # noqa: F401  (the recipe side, re-exported under seft.finetune)
    DEFAULT_LR,
    DENSE_METHODS,
    MERGE_ONLY,
    METHODS,
    RECIPE_KEYS,
    REPORT_NAME,
    SEFT_METHODS,
    SPARSE_METHODS,
    FinetuneConfig,
    FinetuneJob,
    _build,
    job_from_recipe,
)
from .io import atomic_output_dir, check_output, input_paths, write_json
from .models import decoder_layers, load_model, save_checkpoint, target_linears

logger = logging.getLogger(__name__)


# --- Trainer wiring -------------------------------------------------------------------

def training_arguments(job: FinetuneJob, work_dir: Path):
    from transformers import TrainingArguments

    kwargs = job.training_overrides()
    if "output_dir" in job.train:
        raise SeftError("set the output folder with the top-level 'output' (or --output), not train.output_dir")
    if kwargs.get("gradient_checkpointing"):
        kwargs.setdefault("gradient_checkpointing_kwargs", {"use_reentrant": False})
    if int(kwargs.get("max_steps", -1)) <= 0:
        raise SeftError("train.max_steps must be a positive number of optimizer steps (SEFT's schedule needs it)")
    try:
        return _build(TrainingArguments, {"output_dir": str(work_dir), **kwargs}, "train")
    except ValueError as exc:  # e.g. bf16 asked for on a machine without support
        raise SeftError(f"train settings rejected by transformers: {str(exc).splitlines()[0]}") from None


def mask_callback(masks: dict[str, torch.Tensor]):
    """full-masked: a TrainerCallback that re-applies the base mask after every optimizer step."""
    from transformers import TrainerCallback

    from .baselines import apply_masks

    class MaskCallback(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            apply_masks(model, masks)

    return MaskCallback()


def prepare(job: FinetuneJob, model: nn.Module) -> tuple[nn.Module, list]:
    """Wrap `model` for the job's method; returns (model to train, Trainer callbacks)."""
    method = job.config.method
    if method in SEFT_METHODS:
        import peft

        from .tuner import SeftCallback

        return peft.get_peft_model(model, job.seft_config()), [SeftCallback()]
    if method == "masked-lora":
        from .baselines import apply_masked_lora

        return apply_masked_lora(model, job.rank(), job.config.lora_alpha), []
    if method in ("lora-reprune", "lora-mask", "lora"):
        import peft

        from .models import TARGET_MODULES

        lora = peft.LoraConfig(r=job.rank(), lora_alpha=job.config.lora_alpha, lora_dropout=0.0,
                               target_modules=list(TARGET_MODULES), task_type="CAUSAL_LM")
        return peft.get_peft_model(model, lora), []
    from .baselines import enable_full_masked

    return model, [mask_callback(enable_full_masked(model))]


def merge(job: FinetuneJob, trained: nn.Module, tokenizer, base_masks: dict[str, torch.Tensor]) -> nn.Module:
    """The method's merged, sparse model (a plain transformers model)."""
    method = job.config.method
    if method == "masked-lora":
        from .baselines import merge_masked_lora

        return merge_masked_lora(trained)
    if method == "full-masked":
        return trained
    merged = trained.merge_and_unload()  # lora: the plain merge, nothing re-sparsified
    if method == "lora-mask":
        from .baselines import apply_masks

        apply_masks(merged, base_masks)
    elif method == "lora-reprune":
        from .prune import PruneConfig, prune_model

        sparsity, pattern = base_sparsity_and_pattern(base_masks)
        cfg = PruneConfig(method="wanda", sparsity=None if pattern != "unstructured" else sparsity, pattern=pattern,
                          calibration=job.config.calibration, num_samples=job.config.calibration_samples,
                          seq_len=job.config.calibration_seq_len, seed=0).validate()
        prune_model(merged, tokenizer, cfg, progress=False)
    return merged


def _merge_on_fp(job: FinetuneJob, adapter_dir: Path) -> nn.Module:
    """QSEFT merge: the saved adapter onto the *unquantized* pruned checkpoint (never the NF4 weights)."""
    import peft

    base, _ = load_model(job.model, dtype=job.config.dtype)
    return peft.PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()


def base_sparsity_and_pattern(masks: dict[str, torch.Tensor]) -> tuple[float, str]:
    """The base's sparsity over target linears, and its N:M pattern if every layer has one."""
    from .sparsity import detect_nm, format_pattern

    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    patterns = {detect_nm(m.to(torch.uint8)) for m in masks.values()}
    pattern = patterns.pop() if len(patterns) == 1 else None
    return round(1 - kept / total, 6), format_pattern(pattern)


def layer_sparsity(model: nn.Module) -> dict[str, float]:
    """{'3.mlp.down_proj': sparsity} over the target linears (4-bit: the fp checkpoint's zeros)."""
    return {name: 1.0 - float((w != 0).sum()) / w.numel() for name, w in _target_weights(model)}


def _target_weights(model: nn.Module):
    from .tuner.quant import is_4bit, topology_weight

    for i, layer in enumerate(decoder_layers(model)):
        for name, lin in target_linears(layer).items():
            yield f"{i}.{name}", (topology_weight(lin) if is_4bit(lin) else lin.weight)


def model_pattern(model: nn.Module) -> str:
    """'N:M' if every target linear follows one N:M pattern, else 'unstructured'."""
    from .sparsity import common_nm, format_pattern

    return format_pattern(common_nm(w for _, w in _target_weights(model)))


def peak_memory() -> dict[str, float]:
    """Peak process RSS (CPU) and peak CUDA allocation, in GiB."""
    out = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if torch.cuda.is_available():
        out["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def work_dir_for(output: str | os.PathLike) -> Path:
    output = Path(output).absolute()
    return output.parent / f".{output.name}.work"


def _held_out_ppl(job: FinetuneJob, model: nn.Module, tokenizer) -> dict | None:
    if not job.config.eval_data:
        return None
    from .perplexity import perplexity

    return perplexity(model, tokenizer, job.config.eval_data, job.config.eval_seq_len,
                      max_windows=job.config.eval_windows, progress=False).as_dict()


def _check_before_work(job: FinetuneJob) -> tuple[object, Path]:
    """Everything that can fail without the model: sources, sequence lengths, the output; (plan, work dir)."""
    from .models import check_seq_len, checkpoint_bytes, load_config, local_model_folder

    cfg = job.config
    cfg.check_sources()
    merge_wanted = cfg.merge or cfg.method in MERGE_ONLY
    if cfg.method in SEFT_METHODS and job.adapter.get("drop_values") == "fold":
        if not merge_wanted or job.training_overrides().get("save_strategy") != "no" or cfg.resume:
            raise SeftError("adapter.drop_values: fold (a study option) folds dropped values into the base "
                            "weights in memory, which no adapter file or checkpoint carries: use it with --merge, "
                            "train.save_strategy: no and without --resume")
    sources = (cfg.data, cfg.eval_data, cfg.calibration if cfg.method == "lora-reprune" else None)
    plan = check_output(job.output, job.overwrite, input_paths(local_model_folder(job.model), *sources),
                        size=checkpoint_bytes(job.model, cfg.dtype) if merge_wanted else None)
    lengths = {"seq_len": cfg.seq_len}
    if cfg.eval_data:
        lengths["eval_seq_len"] = cfg.eval_seq_len
    if cfg.method == "lora-reprune":
        lengths["calibration_seq_len"] = cfg.calibration_seq_len
    check_seq_len(load_config(job.model), **lengths)
    return plan, work_dir_for(job.output)


def run_finetune(job: FinetuneJob, progress: bool = True) -> dict:
    """The whole `seft finetune` run; returns the train report (also written to OUTPUT)."""
    from transformers import Trainer

    from .checkpoints import checkpoint_marker, checkpoints, resume_checkpoint
    from .data import pad_collate, training_dataset
    from .train_guards import check_finite, finite_guard, sparsity_change

    cfg = job.config.validate()
    plan, work = _check_before_work(job)
    output = plan.path
    resume_from = None
    if cfg.resume:
        resume_from = resume_checkpoint(work)
    elif work.exists():
        if checkpoints(work) and not job.overwrite:
            raise SeftError(f"{work} holds checkpoints of an interrupted run; pass --resume to continue it "
                            "or --overwrite to start over")
        shutil.rmtree(work)
    args = training_arguments(job, work)
    if not progress:
        args.disable_tqdm = True
    from .launch_check import warn_if_single_process

    warn_if_single_process(args.world_size)  # every method, before the model loads (SeftCallback: once more, muted)

    def kept() -> str:
        return f"; nothing was written to {output}" + (
            f" (the checkpoints of earlier steps are in {work})" if checkpoints(work) else "")

    t_start = time.perf_counter()
    model, tokenizer = load_model(job.model, dtype=cfg.dtype, load_in_4bit=cfg.load_in_4bit)
    masks = {} if cfg.load_in_4bit else base_masks(model)  # 4-bit: SEFT methods only, which need none
    before, pattern_before = layer_sparsity(model), model_pattern(model)
    dataset = training_dataset(tokenizer, cfg.data, cfg.seq_len, "train")
    ppl_before = _held_out_ppl(job, model, tokenizer)
    trained, callbacks = prepare(job, model)
    trainable = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    logger.info("%s: %d trainable parameters, %d training examples, %d steps",
                cfg.method, trainable, len(dataset), args.max_steps)
    trainer = Trainer(model=trained, args=args, train_dataset=dataset, data_collator=pad_collate(tokenizer.pad_token_id),
                      processing_class=tokenizer, callbacks=[*callbacks, finite_guard(kept), checkpoint_marker()])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t_train = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=resume_from)
    except BaseException:
        if not checkpoints(work):  # nothing to resume from: leave no empty work folder behind
            shutil.rmtree(work, ignore_errors=True)
        raise
    train_seconds = time.perf_counter() - t_train
    memory = peak_memory()
    check_finite(trained, f"not saving the trained {cfg.method} state", trainable_only=True, after=kept())

    topology = _topology_history(trainer)
    adapter_report = trained.seft_sparsity_report() if cfg.method in SEFT_METHODS else None
    merge_wanted = cfg.merge or cfg.method in MERGE_ONLY

    with atomic_output_dir(plan, command="seft finetune") as tmp:
        adapter_bytes = _save_adapter(cfg.method, trained, Path(tmp))
        merged_after = ppl_after = pattern_after = None
        if merge_wanted:
            merged = _merge_on_fp(job, Path(tmp)) if cfg.load_in_4bit else merge(job, trained, tokenizer, masks)
            check_finite(merged, "not saving the merged model", trainable_only=False, after=kept())
            merged_after, pattern_after = layer_sparsity(merged), model_pattern(merged)
            broken = None if cfg.method in DENSE_METHODS else sparsity_change(before, merged_after, pattern_before,
                                                                             pattern_after)
            if broken:
                raise SeftError(f"the merged model is not as sparse as the pruned base ({broken}){kept()}")
            save_checkpoint(merged, tokenizer, Path(tmp) / "merged")
            ppl_after = _held_out_ppl(job, merged, tokenizer)
        else:
            ppl_after = _held_out_ppl(job, trained, tokenizer)
        report = {
            "model": job.model, "method": cfg.method, "data": cfg.data, "seq_len": cfg.seq_len,
            "steps": int(trainer.state.global_step), "resumed_from": resume_from,
            "train_seconds": round(train_seconds, 2),
            "seconds_per_step": round(train_seconds / max(trainer.state.global_step, 1), 3),
            "total_seconds": round(time.perf_counter() - t_start, 2),
            "train_loss": result.training_loss, "trainable_params": trainable, "adapter_bytes": adapter_bytes,
            "memory": memory, "perplexity_before": ppl_before, "perplexity_after": ppl_after,
            "sparsity_before": _summary(before), "sparsity_after_merge": _summary(merged_after) if merged_after else None,
            "pattern_before": pattern_before, "pattern_after_merge": pattern_after,
            # a merge that breaks it fails above; a dense method makes no such promise (None)
            "sparsity_preserved": True if merged_after and cfg.method not in DENSE_METHODS else None,
            "adapter_sparsity": adapter_report, "topology_updates": topology,
            "recipe": job.as_recipe(), "log_history": trainer.state.log_history,
        }
        write_json(Path(tmp) / REPORT_NAME, report)
        _keep_tensorboard_logs(work, Path(tmp), output)
    shutil.rmtree(work, ignore_errors=True)
    return report


TENSORBOARD_DIR = "runs"


def _keep_tensorboard_logs(work: Path, output: Path, final: Path) -> None:
    """Copy the TensorBoard event files (`train.report_to: tensorboard`) from the work folder into OUTPUT/runs.

    The Trainer writes them under its output_dir, which is the work folder removed after a successful run;
    copied (not moved) so a failure before the final rename still leaves them, with the checkpoints, in the
    work folder. A TENSORBOARD_LOGGING_DIR outside the work folder is the user's and is left alone.
    """
    runs = work / TENSORBOARD_DIR
    if runs.is_dir() and any(runs.rglob("events.out.tfevents.*")):
        shutil.copytree(runs, output / TENSORBOARD_DIR, dirs_exist_ok=True)
        logger.info("TensorBoard event files kept in %s", Path(final) / TENSORBOARD_DIR)


def _summary(per_layer: dict[str, float] | None) -> dict | None:
    if not per_layer:
        return None
    values = list(per_layer.values())
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "per_layer": per_layer}


def _topology_history(trainer) -> list[dict]:
    """Every topology update of the run, from the Trainer's log history.

    SeftCallback merges each update's statistics into the log entry of its
    step, and the log history is part of a checkpoint, so a resumed run still
    reports the updates made before the interruption.
    """
    return [{"step": e["step"], **{k: v for k, v in e.items() if k.startswith("seft/")}}
            for e in trainer.state.log_history if any(k.startswith("seft/") for k in e)]


def _save_adapter(method: str, trained: nn.Module, folder: Path) -> int | None:
    """Write the trainable state; returns the adapter file's size in bytes (None: nothing to write, or a
    `drop_values: fold` run, whose product exists only merged)."""
    if method in SEFT_METHODS and trained.seft_config().drop_values == "fold":
        return None
    if method in SEFT_METHODS or method in ("lora-reprune", "lora-mask", "lora"):
        trained.save_pretrained(folder)
        return (folder / "adapter_model.safetensors").stat().st_size
    if method == "masked-lora":
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous() for k, v in trained.state_dict().items() if "lora_" in k}
        save_file(state, folder / "masked_lora.safetensors")
        return (folder / "masked_lora.safetensors").stat().st_size
    return None


def ppl_table(report: dict) -> str:
    """A short markdown summary of a finetune report."""
    def fmt(p):
        return "n/a" if not p else f"{p['perplexity']:.2f}"

    rows = [
        "| stage | held-out ppl | sparsity |",
        "|---|---|---|",
        f"| before ({report['method']}) | {fmt(report['perplexity_before'])} | {report['sparsity_before']['mean']:.4f} |",
    ]
    after = report["sparsity_after_merge"]["mean"] if report["sparsity_after_merge"] else float("nan")
    rows.append(f"| after | {fmt(report['perplexity_after'])} | {after if not math.isnan(after) else 'unmerged'} |")
    return "\n".join(rows)
