"""`tunesmith COMMAND ...`: a table from command name to function; each takes parsed arguments.

Exit codes: 0 success, 1 a problem with the data or the run, 2 a problem with the recipe or the command line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from tunesmith.recipe import RecipeError, load

RECIPES = Path(__file__).parent / "recipes"


def cmd_train(args) -> int:
    from tunesmith.run import Run
    from tunesmith.train import train

    if args.resume:
        recipe = Run(args.resume).recipe()
        if args.recipe or args.overrides:
            raise RecipeError("command line", ["--resume takes the run's own recipe; drop RECIPE and overrides"])
        train(recipe, resume=args.resume)
        return 0
    if not args.recipe:
        raise RecipeError("command line", ["give a RECIPE (yaml file) or --resume RUN_DIR"])
    recipe = load(args.recipe, args.overrides)      # every recipe error, before any weights load
    train(recipe, run_dir=args.run_dir)
    return 0


def _load_run(run_dir: str):
    from tunesmith.run import Run
    from tunesmith.tasks import get_task

    run = Run(run_dir)
    task = get_task(run.recipe())
    model, processor = task.load_trained(run.model_dir)
    return run, task, model.eval(), processor


def cmd_eval(args) -> int:
    import torch

    from tunesmith.train import load_rows_for_eval

    run, task, model, _ = _load_run(args.run_dir)
    rows = load_rows_for_eval(task, run, args.data)
    with torch.no_grad():
        result = task.evaluate_final(model, rows, task.encode(rows), task.recipe.eval.batch_size)
    print(json.dumps(result, indent=2))
    return 0


def cmd_predict(args) -> int:
    from tunesmith import data as datalib

    run, task, model, processor = _load_run(args.run_dir)
    inputs = list(args.inputs)
    if args.input:
        table = datalib.read(args.input, "predict", task.path_columns) if not args.input.endswith(".txt") else None
        inputs += table.rows if table else [ln for ln in Path(args.input).read_text().splitlines() if ln.strip()]
    if not inputs:
        raise RecipeError("command line", ["give inputs: tunesmith predict RUN_DIR \"text\" ... or --input FILE"])
    for out in task.predict(model, processor, inputs):
        print(json.dumps(out))
    return 0


def cmd_demo(args) -> int:
    """Fine-tune the bundled MiniLM on bundled Rotten Tomatoes snippets; print before/after metrics."""
    from tunesmith.train import train

    recipe = load(RECIPES / "rotten_tomatoes.yaml", args.overrides)
    run = train(recipe, run_dir=args.run_dir)
    result = json.loads((run.path / "eval.json").read_text())
    before = result.get("before", {})
    print(f"\n{'metric':<12}{'before':>10}{'after':>10}   (test split, {result['n_examples']:,} snippets)")
    for key in ("accuracy", "f1_macro"):
        print(f"{key:<12}{before.get(key, float('nan')):>10.4f}{result[key]:>10.4f}")
    print(f"run folder: {run.path}")
    return 0


def cmd_doctor(args) -> int:
    """Check a recipe's data; print the report, write doctor.json; 1 when something blocks training."""
    from tunesmith.doctor import diagnose, render, write

    recipe = load(args.recipe, args.overrides)
    report = diagnose(recipe)
    print(render(report, recipe.doctor.listed))
    print(f"doctor.json: {write(report, args.out)}")
    return 1 if report["blocking"] else 0


def cmd_compare(args) -> int:
    """The scalar metrics of several runs' eval.json side by side (e.g. pretrained vs from scratch)."""
    from tunesmith.run import Run

    columns = []
    for path in args.run_dirs:
        run = Run(path)
        if not (run.path / "eval.json").exists():
            raise FileNotFoundError(f"{run.path}: no eval.json (not a finished run)")
        recipe, result = run.recipe(), json.loads((run.path / "eval.json").read_text())
        log = run.path / "metrics.jsonl"
        summary = [json.loads(x) for x in log.read_text().splitlines() if '"summary"' in x] if log.exists() else []
        extra = {"train_seconds": summary[-1]["train_seconds"]} if summary and "train_seconds" in summary[-1] else {}
        columns.append((run.path.name, f"{recipe.model.name}{'' if recipe.model.pretrained else ' (scratch)'}",
                        {**result, **extra}))
    keys = list(dict.fromkeys(k for _, _, r in columns for k, v in r.items()
                              if isinstance(v, (int, float)) and not isinstance(v, bool)))
    width = max(14, *(len(c[0]) + 2 for c in columns), *(len(c[1]) + 2 for c in columns))
    print(f"{'':<20}" + "".join(f"{name:>{width}}" for name, _, _ in columns))
    print(f"{'model':<20}" + "".join(f"{model:>{width}}" for _, model, _ in columns))
    for key in keys:
        values = [r.get(key) for _, _, r in columns]
        print(f"{key:<20}" + "".join(f"{'-':>{width}}" if v is None else f"{v:>{width},}" if isinstance(v, int)
                                     else f"{v:>{width}.4f}" for v in values))
    return 0


def cmd_chat(args) -> int:
    """Interactive chat with a causal-lm run's model: streaming, multi-turn (tunesmith/chat.py)."""
    from tunesmith.chat import chat

    return chat(args.run_dir, args.max_new_tokens, args.context, args.system)


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "demo": cmd_demo, "doctor": cmd_doctor,
            "compare": cmd_compare, "chat": cmd_chat}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tunesmith", description="Fine-tune pretrained models from a YAML recipe.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="fine-tune as a recipe says")
    t.add_argument("recipe", nargs="?", help="recipe YAML file")
    t.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.epochs=1")
    t.add_argument("--run-dir", help="run folder (default runs/<name>-<time>)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its newest checkpoint")
    e = sub.add_parser("eval", help="metrics of a run's model as JSON")
    e.add_argument("run_dir")
    e.add_argument("--data", help="file to evaluate on (default: the run's test split)")
    pr = sub.add_parser("predict", help="one JSON line per input")
    pr.add_argument("run_dir")
    pr.add_argument("inputs", nargs="*")
    pr.add_argument("--input", help="file of inputs (.jsonl, .csv, .parquet, or .txt with one per line)")
    d = sub.add_parser("demo", help="fine-tune MiniLM on Rotten Tomatoes, show before/after")
    d.add_argument("overrides", nargs="*")
    d.add_argument("--run-dir")
    c = sub.add_parser("compare", help="eval.json metrics of several runs side by side")
    c.add_argument("run_dirs", nargs="+")
    dr = sub.add_parser("doctor", help="find problems in a recipe's data before training (exit 1: blocking)")
    dr.add_argument("recipe", help="recipe YAML file")
    dr.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. doctor.label_noise=false")
    dr.add_argument("--out", default="doctor.json", help="where to write the JSON report (default ./doctor.json)")
    ch = sub.add_parser("chat", help="talk to a causal-lm run's model in the terminal (streaming, multi-turn)")
    ch.add_argument("run_dir")
    ch.add_argument("--max-new-tokens", type=int, help="tokens per reply (default: eval.generate's, else 256)")
    ch.add_argument("--context", type=int, help="tokens of history kept (default: the model's context length)")
    ch.add_argument("--system", help="a system message to start the conversation with")
    return p


def main(argv: list[str] | None = None) -> int:
    from tunesmith.data import DataError

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (DataError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
