"""`trainctl merge RUN_DIR... --method METHOD -o OUT`: combine runs of one model into one set of weights
(the arithmetic is in :mod:`trainctl.merging`). Every input and the result are evaluated on the validation
split of the first input's spec, with trainctl's own evaluation; OUT is an export (model.safetensors,
trainctl.yaml, export.json) that `trainctl eval OUT` evaluates, plus merge.json with what was merged and
how each input and the result scored."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from trainctl.errors import ConfigError, check, did_you_mean
from trainctl.merging import DENSE, PEFT_FUNCTIONS

METHODS = ("average", "greedy_soup", "slerp", *PEFT_FUNCTIONS)
REPORT = "merge.json"
HF_EXTRA = "pip install 'trainctl[hf]'"


def main(argv: Sequence[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="trainctl merge", description="Combine runs of one model (same tensor names and shapes) into one "
        "set of weights, evaluate every input and the result on the validation split, and write OUT.")
    parser.add_argument("inputs", nargs="+", help="run directories, checkpoint directories, exports, or sweep "
                        "directories (each stands for its job run directories)")
    parser.add_argument("--method", required=True, help="average | greedy_soup | slerp (two inputs) | "
                        "task_arithmetic | ties | dare | dare_ties | magnitude_prune (relative to --base)")
    parser.add_argument("-o", "--output", required=True, help="a new directory for the merged weights")
    parser.add_argument("--t", type=float, default=0.5, help="slerp: 0 gives the first input, 1 the second")
    parser.add_argument("--base", help="task-vector methods: the weights the inputs were fine-tuned from (a run, "
                        "checkpoint or export directory, or a .safetensors file)")
    parser.add_argument("--weights", help="comma-separated, one per input: average (normalised to sum 1) and "
                        "the task-vector methods (default 1/N for task_arithmetic and dare, 1 otherwise)")
    parser.add_argument("--density", type=float, default=0.5, help="ties, dare, dare_ties, magnitude_prune: "
                        "the fraction of each task vector kept (default 0.5)")
    parser.add_argument("--scale", type=float, default=1.0, help="task-vector methods: base + scale * merged")
    parser.add_argument("--seed", type=int, default=0, help="dare, dare_ties: the seed of the random drops")
    parser.add_argument("--metric", help="the validation metric that sorts and selects (default: the first "
                        "input's trainer.monitor, e.g. val/acc)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a change to every input's saved spec (e.g. trainer.device=cpu); repeatable")
    parser.add_argument("--json", action="store_true", help="print merge.json instead of a table")
    args = parser.parse_args(argv)
    if args.method not in METHODS:
        close = did_you_mean(args.method, METHODS, 1) or ["greedy_soup"]
        raise ConfigError("--method", f"'{args.method}' is not one of {', '.join(METHODS)}", f"pass --method {close[0]}")
    output = Path(args.output).absolute()
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ConfigError("-o", f"{output} already exists and is not empty", "pass -o with a new directory, "
                          "or remove that one")
    _check_options(args)
    paths = expand_inputs(args.inputs)
    _check_count(args, paths)
    report = merge(paths, args, output)
    if args.json:
        import json

        print(json.dumps(report, indent=2), flush=True)
    else:
        print_table(report)


def _check_options(args: Any) -> None:
    task = args.method in PEFT_FUNCTIONS
    check(0.0 <= args.t <= 1.0, "--t", f"must be between 0 and 1, got {args.t}", "pass --t 0.5")
    check(0.0 < args.density <= 1.0, "--density", f"must be in (0, 1], got {args.density}", "pass --density 0.5")
    if task:
        try:
            import peft.utils.merge_utils  # noqa: F401
        except ImportError:
            raise ConfigError("--method", f"{args.method} uses the merge functions of the peft package, which is "
                              "not installed", HF_EXTRA) from None
    else:
        check(args.base is None, "--base", f"{args.method} does not use a base", "leave out --base, or use "
              "--method task_arithmetic | ties | dare")
    check(args.weights is None or args.method not in ("greedy_soup", "slerp"), "--weights",
          f"{args.method} does not take weights", "leave out --weights" + (" (use --t)" if args.method == "slerp"
                                                                           else ""))
    if args.weights is not None:
        try:
            args.weights = [float(w) for w in args.weights.split(",")]
        except ValueError:
            raise ConfigError("--weights", f"'{args.weights}' is not a comma-separated list of numbers",
                              "pass e.g. --weights 0.5,0.5") from None


def _check_count(args: Any, paths: List[Path]) -> None:
    check(len(paths) >= 2, "inputs", f"{args.method} needs at least two runs, got {len(paths)}",
          "pass two or more run directories, or a sweep directory")
    check(args.method != "slerp" or len(paths) == 2, "--method", f"slerp interpolates between two runs, got "
          f"{len(paths)}", "pass exactly two run directories, or use --method average or greedy_soup")
    if args.weights is not None:
        check(len(args.weights) == len(paths), "--weights", f"{len(args.weights)} weights for {len(paths)} "
              "inputs", "pass one weight per input, in the order of the inputs")
        check(args.method != "average" or sum(args.weights) > 0, "--weights", "must have a positive sum",
              "pass e.g. --weights 0.5,0.5")


def expand_inputs(texts: Sequence[str]) -> List[Path]:
    """Run, checkpoint and export directories as given; a sweep directory (or a glob) becomes its job run
    directories that hold weights (failed jobs are skipped, with a note)."""
    from trainctl.export import is_export
    from trainctl.report import find_runs

    found: List[Path] = []
    for text in texts:
        path = Path(text)
        if path.is_dir() and (is_export(path) or any((path / n).is_file() for n in ("config.yaml", "spec.yaml",
                                                                                    "state.pt"))):
            found.append(path)
            continue
        runs = find_runs([text])
        usable = [r for r in runs if (r / "model.safetensors").is_file() or (r / "checkpoints").is_dir()]
        if len(usable) < len(runs):
            skipped = ", ".join(str(r) for r in runs if r not in usable)
            print(f"trainctl merge: skipping run directories without weights (failed jobs?): {skipped}",
                  file=sys.stderr, flush=True)
        found += usable
    return list({p.resolve(): p for p in found}.values())


def _progress(text: str) -> None:
    print(f"trainctl merge: {text}", file=sys.stderr, flush=True)


def _load(path: Path, overrides: List[str], base_dir: str) -> Tuple[Any, Dict[str, Any]]:
    """(the run rebuilt from ``path`` with its weights, a CPU copy of its whole state dict)."""
    from trainctl.job import load_saved_run

    run = load_saved_run(path, overrides, base_dir)[0]
    if run.spec.peft.adapters:
        raise ConfigError(None, f"{path} was trained with adapters (peft={run.spec.peft.name}): its saved weights "
                          "are the adapters, which cannot be averaged factor by factor",
                          f"merge the adapters first: trainctl export {path} --merge -o DIR, then merge the DIRs")
    return run, {k: v.detach().to("cpu", copy=True) for k, v in run.model.state_dict().items()}


def _load_base(text: str, overrides: List[str], base_dir: str) -> Dict[str, Any]:
    path = Path(text)
    if path.is_file():
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors' own error types
            raise ConfigError("--base", f"{path} is not a readable safetensors file: {exc}") from None
    check(path.is_dir(), "--base", f"{path}: no such file or directory", "pass a run directory or a .safetensors file")
    return _load(path, overrides, base_dir)[1]


def merge(paths: List[Path], args: Any, output: Path) -> Dict[str, Any]:
    """Load, check, evaluate and merge the inputs; write OUT; return the report (merge.json)."""
    from trainctl import merging
    from trainctl.export import export_run
    from trainctl.runs import metric_mode

    base_dir = os.getcwd()
    names = [str(p) for p in paths]
    _progress(f"loading {len(paths)} inputs")
    reference, first = _load(paths[0], args.set, base_dir)
    states = [first] + [_load(p, args.set, base_dir)[1] for p in paths[1:]]
    if args.method in PEFT_FUNCTIONS and args.base is None:  # the weights the inputs were fine-tuned from
        from trainctl.model import is_custom

        spec = reference.spec.model
        args.base = spec.get("init_from") if is_custom(spec) else spec.init_from
        check(args.base is not None, "--base", f"{args.method} merges task vectors (input - base) and needs the "
              f"weights the inputs started from; {paths[0]} has no model.init_from",
              "pass --base RUN_DIR (or a .safetensors file)")
        _progress(f"base: {args.base} (the model.init_from of {paths[0]})")
    base = _load_base(args.base, args.set, base_dir) if args.base else None
    merging.check_same_model(states + ([base] if base is not None else []),
                             names + ([f"the base {args.base}"] if base is not None else []))
    task = reference.data.info.task
    metric = args.metric or reference.spec.monitor(task)
    mode = metric_mode(metric) if args.metric else reference.spec.monitor_mode(task)
    evaluations = {"count": 0}
    total = len(paths) + (len(paths) - 1 if args.method == "greedy_soup" else 1)

    def evaluate(state: Dict[str, Any], what: str) -> Dict[str, float]:
        evaluations["count"] += 1
        start = time.perf_counter()
        reference.model.load_state_dict(state)
        metrics = reference.evaluator(reference.model, reference.data.val, reference.precision.autocast)
        if metric not in metrics:
            raise ConfigError("--metric", f"'{metric}' is not reported; the evaluation gives "
                              f"{', '.join(metrics)}", f"pass --metric {next(iter(metrics))}")
        _progress(f"[{evaluations['count']}/{total}] {what}: {metric} {metrics[metric]:.4f} "
                  f"({time.perf_counter() - start:.1f} s)")
        return metrics

    inputs = [{"path": name, "metrics": evaluate(state, name)} for name, state in zip(names, states)]
    report: Dict[str, Any] = {"method": args.method, "inputs": inputs}
    if args.method == "greedy_soup":
        candidates: List[Dict[str, float]] = []

        def score(state: Any, index: int) -> float:
            candidates.append(evaluate(state, f"soup + {names[index]}"))
            return candidates[-1][metric]
        merged, kept, _, steps = merging.greedy_soup(states, [i["metrics"][metric] for i in inputs], score, mode)
        merged_metrics = inputs[kept[0]]["metrics"]  # the best input, unless a larger soup did at least as well
        for step, metrics in zip(steps[1:], candidates):
            merged_metrics = metrics if step["kept"] else merged_metrics
        report["kept"] = [names[i] for i in kept]
        report["steps"] = [{"input": names[s["input"]], metric: s["soup_score"], "kept": s["kept"]} for s in steps]
        for i, entry in enumerate(inputs):
            entry["kept"] = i in kept
    else:
        if args.method == "average":
            weights = None if args.weights is None else [w / sum(args.weights) for w in args.weights]
            merged = merging.weighted_average(states, weights)
            report["weights"] = weights or [1 / len(states)] * len(states)
        elif args.method == "slerp":
            merged = merging.slerp(states[0], states[1], args.t)
            report["t"] = args.t
        else:
            uniform = args.method in ("task_arithmetic", "dare")
            weights = args.weights or [1 / len(states) if uniform else 1.0] * len(states)
            merged = merging.task_merge(base, states, args.method, weights, args.density, args.scale, args.seed)
            report.update({"base": args.base, "weights": weights, "scale": args.scale,
                           "peft_function": f"peft.utils.merge_utils.{PEFT_FUNCTIONS[args.method]}"})
            if args.method not in DENSE:
                report["density"] = args.density
            if args.method.startswith("dare"):
                report["seed"] = args.seed
        merged_metrics = evaluate(merged, "merged")
    reference.model.load_state_dict(merged)
    report.update({"metric": metric, "mode": mode, "merged": {"metrics": merged_metrics},
                   "evaluated_on": {"spec_of": names[0], "data": reference.spec.data.name, "split": "val",
                                    "samples": reference.data.info.n_val}})
    _full_weights(reference.model)
    run_dir = paths[0] if (paths[0] / "config.yaml").is_file() else None
    result = export_run(reference, Path(REPORT), None, run_dir, paths[0], output, False, extra={REPORT: report})
    report["output"] = result["output"]
    return report


def _full_weights(model: Any) -> None:
    """A run with frozen weights (peft=freeze) saves only its trainable tensors; the merged model is whole
    (its spec in OUT has no init_from), so it is written whole."""
    from trainctl.adapters import TRAINABLE_ONLY

    for module in [model, *model.modules()]:
        if hasattr(module, TRAINABLE_ONLY):
            delattr(module, TRAINABLE_ONLY)


def print_table(report: Dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    metric = report["metric"]
    names = list(report["merged"]["metrics"])
    ordered = [metric] + [n for n in names if n != metric]
    where = report["evaluated_on"]
    table = Table(title=f"trainctl merge: {report['method']} of {len(report['inputs'])} runs, "
                  f"{where['data']} ({where['samples']} validation samples)", title_justify="left")
    table.add_column("weights")
    if report["method"] == "greedy_soup":
        table.add_column("in soup")
    for name in ordered:
        table.add_column(name, justify="right")
    best = max if report["mode"] == "max" else min
    best_input = best(i["metrics"][metric] for i in report["inputs"])
    for entry in report["inputs"]:
        soup = ["yes" if entry["kept"] else "no"] if report["method"] == "greedy_soup" else []
        table.add_row(entry["path"], *soup, *(f"{entry['metrics'][n]:.4f}" for n in ordered))
    merged = report["merged"]["metrics"]
    soup = [""] if report["method"] == "greedy_soup" else []
    table.add_row(f"[bold]merged -> {report['output']}[/bold]", *soup,
                  *(f"[bold]{merged[n]:.4f}[/bold]" for n in ordered))
    console = Console()
    console.print(table)
    change = merged[metric] - best_input
    console.print(f"merged {metric} {merged[metric]:.4f} vs best input {best_input:.4f} ({change:+.4f}); "
                  f"`trainctl eval {report['output']}` evaluates it again", highlight=False)
