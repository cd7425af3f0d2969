"""Pruning: magnitude, Wanda and SparseGPT, unstructured and N:M, one sequential engine.

`prune_model` works on a model in memory; `prune_checkpoint` is what the CLI
runs: load -> prune -> write checkpoint + tokenizer + sparsity_report.json
atomically (an interrupted run leaves nothing under the output name).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from ..io import atomic_output_dir, check_output, input_paths, write_json
from .config import METHODS, PruneConfig

logger = logging.getLogger(__name__)

REPORT_NAME = "sparsity_report.json"

__all__ = ["METHODS", "REPORT_NAME", "PruneConfig", "prune_checkpoint", "prune_model"]


def __getattr__(name: str) -> Any:
    """`prune_model` (the engine, torch) loads on first use: the CLI reads this package for its help."""
    if name == "prune_model":
        from .engine import prune_model

        return prune_model
    raise AttributeError(f"module 'seft.prune' has no attribute {name!r}")


def prune_checkpoint(
    model_name: str | os.PathLike,
    output: str | os.PathLike,
    config: PruneConfig,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Load `model_name`, prune it per `config`, save to `output`; return the report.

    Everything cheap is checked first (config, output folder, model path,
    N:M fit), so a typo fails in a second rather than after calibration.
    """
    from ..models import (
        check_seq_len,
        checkpoint_bytes,
        load_config,
        load_model,
        local_model_folder,
        save_checkpoint,
    )
    from .engine import prune_model

    config.validate()
    inputs = input_paths(local_model_folder(model_name), config.calibration if config.needs_data else None)
    plan = check_output(output, overwrite, inputs, size=checkpoint_bytes(model_name, config.dtype))
    if config.needs_data:
        check_seq_len(load_config(model_name), seq_len=config.seq_len)
    t0 = time.perf_counter()
    model, tokenizer = load_model(model_name, dtype=config.dtype)
    report = prune_model(model, tokenizer, config, progress=progress)
    report["model"] = str(model_name)
    report["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    with atomic_output_dir(plan, command="seft prune") as tmp:
        save_checkpoint(model, tokenizer, tmp)
        report["total_seconds"] = round(time.perf_counter() - t0, 3)
        write_json(Path(tmp) / REPORT_NAME, report)
    logger.info("pruned %s to %.1f%% sparsity -> %s", model_name, 100 * report["overall"]["sparsity"], output)
    return report
