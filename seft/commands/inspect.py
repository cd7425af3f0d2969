"""Print a pruned checkpoint's sparsity report (sparsity_report.json) as a table.

  seft inspect out/wanda50            per-layer table + overall
  seft inspect out/wanda50 --modules  one row per linear module
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import SeftError

NAME = "inspect"
HELP = "show the sparsity report of a pruned checkpoint"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="a folder written by `seft prune`")
    p.add_argument("--modules", action="store_true", help="one row per linear module instead of per layer")


def load_report(folder: str | Path) -> dict:
    from ..prune import REPORT_NAME

    folder = Path(folder)
    path = folder / REPORT_NAME
    if not folder.is_dir():
        raise SeftError(f"no folder {folder}")
    if not path.is_file():
        raise SeftError(f"{folder} holds no {REPORT_NAME}; is it a `seft prune` output?")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SeftError(f"{path} is not valid JSON ({exc.msg})") from None


def format_report(report: dict, modules: bool = False) -> str:
    calib = report.get("calibration")
    lines = [
        f"model: {report.get('model', '?')}   method: {report['method']}   pattern: {report['pattern']}   "
        f"target sparsity: {report['target_sparsity']:.4f}",
        "calibration: " + ("none (data-free)" if not calib else
                           f"{calib['source']}, {calib['num_samples']} x {calib['seq_len']} tokens, seed {calib['seed']}")
        + f"   time: {report['seconds']:.1f}s",
        "",
    ]
    if modules:
        lines.append(f"{'layer':>5}  {'module':<18} {'shape':>12}  {'sparsity':>8}")
        for layer in report["layers"]:
            for name, m in layer["modules"].items():
                shape = "x".join(map(str, m["shape"]))
                lines.append(f"{layer['index']:>5}  {name:<18} {shape:>12}  {m['sparsity']:>8.4f}")
    else:
        lines.append(f"{'layer':>5}  {'params':>12}  {'zeros':>12}  {'sparsity':>8}")
        for layer in report["layers"]:
            lines.append(f"{layer['index']:>5}  {layer['params']:>12,}  {layer['zeros']:>12,}  {layer['sparsity']:>8.4f}")
    o = report["overall"]
    lines.append(f"{'all':>5}  {o['params']:>12,}  {o['zeros']:>12,}  {o['sparsity']:>8.4f}" if not modules
                 else f"overall: {o['zeros']:,} of {o['params']:,} zero ({o['sparsity']:.4f})")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    print(format_report(load_report(args.folder), modules=args.modules))
    return 0
