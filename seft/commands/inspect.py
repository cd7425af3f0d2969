"""Show the sparsity of a checkpoint per decoder layer: a prune output, any model folder, or a SEFT adapter.

  seft inspect out/wanda50                  prune output: its sparsity report (per layer + overall)
  seft inspect out/wanda50 --modules        one row per linear module
  seft inspect out/wanda50-seft/merged      any HF model folder: zeros counted from the weights
  seft inspect out/wanda50-seft             SEFT adapter: slots k, removed, revived and active per layer
                                            (the base comes from adapter_config.json, or --base)
  seft inspect out/wanda50 --plot s.png     also write a per-layer sparsity bar chart (PNG)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import SeftError

NAME = "inspect"
HELP = "show per-layer sparsity of a pruned/merged model folder or a SEFT adapter"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="a model folder, a `seft prune` output or a SEFT adapter folder")
    p.add_argument("--modules", action="store_true", help="one row per linear module instead of per layer")
    p.add_argument("--base", help="adapter: the base model folder (default: adapter_config.json's base)")
    p.add_argument("--plot", metavar="FILE.png", help="also write a per-layer sparsity bar chart")


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
    lines += format_report_rows(report, modules)
    return "\n".join(lines)


def format_model(report: dict, modules: bool = False) -> str:
    """A model folder's sparsity counted from its weights (a prune report's table without its metadata)."""
    lines = [f"model: {report['model']}   (zeros counted from the weights of the decoder linears)", ""]
    return "\n".join(lines + format_report_rows(report, modules))


def format_report_rows(report: dict, modules: bool) -> list[str]:
    lines = []
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
    return lines


def format_adapter(report: dict, modules: bool = False) -> str:
    """k / removed / revived / active per layer (or module) of a SEFT adapter."""
    with_base = "active" in report["overall"]
    lines = [f"SEFT adapter: {report['adapter']}   base: {report['base'] or report['base_name'] or '?'}"]
    if not with_base:
        lines.append(f"base checkpoint not found ({report['base_name']!r}): revived/active/sparsity need it; "
                     "pass --base MODEL_FOLDER")
    cols = f"{'k':>9}  {'removed':>9}" + (f"  {'revived':>9}  {'active':>10}  {'base sp.':>8}  {'sparsity':>8}"
                                            if with_base else "")
    lines += ["", (f"{'layer':>5}  {'module':<18} " if modules else f"{'layer':>5}  ") + cols]

    def row(r: dict) -> str:
        text = f"{r['k']:>9,}  {r['removed']:>9,}"
        if with_base:
            text += f"  {r['revived']:>9,}  {r['active']:>10,}  {r['base_sparsity']:>8.4f}  {r['sparsity']:>8.4f}"
        return text

    for layer in report["layers"]:
        if modules:
            for name, r in layer["modules"].items():
                lines.append(f"{layer['index']:>5}  {name:<18} " + row(r))
        else:
            lines.append(f"{layer['index']:>5}  " + row(layer))
    lines.append(f"{'all':>5}  " + (" " * 19 if modules else "") + row(report["overall"]))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ..inspect_model import adapter_sparsity, folder_kind, model_sparsity, plot_sparsity

    folder = Path(args.folder)
    if args.plot:
        plot = Path(args.plot)
        if plot.suffix.lower() != ".png":
            raise SeftError(f"--plot {plot}: give a .png file name")
        if not plot.parent.resolve().is_dir():
            raise SeftError(f"--plot {plot}: folder {plot.parent} does not exist")
    kind = folder_kind(folder)
    base = None
    if kind == "prune":
        report = load_report(folder)
        print(format_report(report, modules=args.modules))
    elif kind == "model":
        report = model_sparsity(folder)
        print(format_model(report, modules=args.modules))
    else:
        report = adapter_sparsity(folder, args.base)
        print(format_adapter(report, modules=args.modules))
        if "sparsity" not in report["overall"]:
            if args.plot:
                raise SeftError("--plot of an adapter needs its base checkpoint: pass --base MODEL_FOLDER")
        else:
            base = [layer["base_sparsity"] for layer in report["layers"]]
    if args.plot:
        plot_sparsity(report["layers"], Path(args.plot), f"{folder} ({kind})", base=base)
        print(f"wrote {args.plot}")
    return 0
