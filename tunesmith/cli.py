"""`tunesmith COMMAND ...`: a table from command name to function; each takes parsed arguments.

Exit codes: 0 success, 1 a problem with the data or the run, 2 a problem with the recipe or the command line,
130 Ctrl-C and 143 SIGTERM (training commits a checkpoint first).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from tunesmith import io, safety
from tunesmith.errors import TunesmithError
from tunesmith.recipe import RecipeError, load

RECIPES = Path(__file__).parent / "recipes"


def cmd_train(args) -> int:
    import tunesmith as ts

    if args.resume:
        if args.recipe or args.overrides:
            raise RecipeError("command line", ["--resume takes the run's own recipe; drop RECIPE and overrides"])
        ts.train(ts.Run(args.resume).recipe, resume=args.resume)
        return 0
    if not args.recipe:
        raise RecipeError("command line", ["give a RECIPE (yaml file) or --resume RUN_DIR"])
    recipe = ts.load_recipe(args.recipe, args.overrides)     # every recipe error, before any weights load
    ts.train(recipe, run_dir=args.run_dir)
    return 0


def cmd_eval(args) -> int:
    import tunesmith as ts

    model = ts.Run(args.run_dir).load(args.device)
    print(io.dumps(model.evaluate(args.data), lambda m: print(m, file=sys.stderr), indent=2))
    return 0


def cmd_predict(args) -> int:
    import tunesmith as ts
    from tunesmith import data as datalib

    model = ts.Run(args.run_dir).load(args.device)
    inputs, where, unread = list(args.inputs), [f"argument {i + 1}" for i in range(len(args.inputs))], {}
    if args.input:
        if args.input.endswith(".txt"):
            lines = [(n, ln) for n, ln in enumerate(Path(args.input).read_text().splitlines(), 1) if ln.strip()]
            inputs += [ln for _, ln in lines]
            where += [f"{args.input}:{n}" for n, _ in lines]
        else:
            table = datalib.read(args.input, "predict", model.task.path_columns)
            # every line in file order: a row that could not be read keeps its place as an error
            order = sorted([(datalib.position(o), o, r) for o, r in zip(table.origins, table.rows)]
                           + [(datalib.position(r.origin), r.origin, r) for r in table.rejects], key=lambda x: x[0])
            for _, origin, item in order:
                if isinstance(item, datalib.Reject):
                    unread[len(inputs)] = item.reason
                inputs.append(item)
                where.append(origin)
    if not inputs:
        raise RecipeError("command line", ["give inputs: tunesmith predict RUN_DIR \"text\" ... or --input FILE"])
    readable = [x for i, x in enumerate(inputs) if i not in unread]
    outputs = iter(model.predict(readable))
    bad = 0
    for i, origin in enumerate(where):
        out = {"error": unread[i]} if i in unread else next(outputs)
        if "error" in out:
            bad += 1
            out = {**out, "input": origin}
        print(json.dumps(out))
    if bad:
        print(f"error: {bad} of {len(where)} input(s) could not be predicted (their lines hold \"error\")",
              file=sys.stderr)
    return 1 if bad else 0


def cmd_demo(args) -> int:
    """Fine-tune the bundled MiniLM on bundled Rotten Tomatoes snippets; print before/after metrics."""
    import tunesmith as ts

    run = ts.train(ts.load_recipe(RECIPES / "rotten_tomatoes.yaml", args.overrides), run_dir=args.run_dir)
    result = run.metrics
    before = result.get("before", {})
    print(f"\n{'metric':<12}{'before':>10}{'after':>10}   (test split, {result['n_examples']:,} snippets)")
    for key in ("accuracy", "f1_macro"):
        print(f"{key:<12}{before.get(key, float('nan')):>10.4f}{result[key]:>10.4f}")
    print(f"run folder: {run.path}")
    return 0


def cmd_doctor(args) -> int:
    """Check a recipe's data; print the report, write doctor.json; 1 when something blocks training."""
    from tunesmith.diagnosis.diagnose import diagnose, write
    from tunesmith.diagnosis.report import render

    recipe = load(args.recipe, args.overrides)
    report = diagnose(recipe)
    print(render(report, recipe.doctor.listed))
    print(f"doctor.json: {write(report, args.out)}")
    return 1 if report["blocking"] else 0


def cmd_compare(args) -> int:
    """The scalar metrics of several runs' eval.json side by side (e.g. pretrained vs from scratch)."""
    from tunesmith.run import Run

    if len(args.run_dirs) == 2 and all((Path(p) / "cv.json").exists() for p in args.run_dirs):
        return compare_cv(*args.run_dirs)
    columns = []
    for path in args.run_dirs:
        run = Run(path)
        if not run.metrics:
            raise TunesmithError(f"{run.path}: no eval.json (not a finished run)")
        recipe, result = run.recipe, run.metrics
        summary = [r for r in run.history if r.get("summary")]
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


def compare_cv(a: str, b: str) -> int:
    """Two cv folders over the same folds: mean per metric and a paired test over folds (tunesmith.selection.cv.paired)."""
    from tunesmith.selection.cv import paired

    ra, rb = (json.loads((Path(p) / "cv.json").read_text()) for p in (a, b))
    test = paired(ra, rb)
    print(f"{'metric':<18}{Path(a).name[:16]:>18}{Path(b).name[:16]:>18}{'a - b':>10}{'p (paired)':>12}")
    for m, t in test.items():
        print(f"{m:<18}{ra['metrics'][m]['mean']:>18.4f}{rb['metrics'][m]['mean']:>18.4f}"
              f"{t['difference']:>+10.4f}{t['p']:>12.3f}{'  *' if t['p'] < 0.05 else ''}")
    print(f"{test[next(iter(test))]['folds']} folds; * : differs beyond fold noise (corrected resampled t-test, p < 0.05)")
    return 0


def cmd_cv(args) -> int:
    """K-fold cross-validation: one run per fold, mean / std / 95% interval per metric, out-of-fold predictions."""
    from tunesmith.selection.cv import cross_validate

    recipe = load(args.recipe, args.overrides)
    folder = args.dir or Path("runs") / f"cv-{recipe.name or recipe.task}"
    cross_validate(recipe, folder, folds=args.folds, repeats=args.repeats)
    print(f"cv folder: {folder}")
    return 0


def cmd_tune(args) -> int:
    """Automated fine-tuning in a wall-time budget: plan, successive halving, table against the plain recipe."""
    from tunesmith.selection.tune import tune

    recipe = load(args.recipe, args.overrides)
    folder = args.dir or Path("runs") / f"tune-{recipe.name or recipe.task}"
    out = tune(recipe, folder, args.budget)
    return 0 if out["best"] else 1


def cmd_chat(args) -> int:
    """Interactive chat with a causal-lm run's model: streaming, multi-turn (tunesmith/serving/repl.py)."""
    from tunesmith.serving.repl import chat

    return chat(args.run_dir, args.max_new_tokens, args.context, args.system)


def cmd_search(args) -> int:
    """Optuna search over the recipe's search space; trials are run folders under the study folder."""
    from tunesmith.selection.search import search

    recipe = load(args.recipe, args.overrides)
    folder = args.dir or Path("runs") / f"search-{args.study or recipe.name or recipe.task}"
    try:
        out = search(recipe, folder, trials=args.trials, budget=args.budget, storage=args.storage, study=args.study)
    except KeyboardInterrupt:
        print(f"interrupted: the trial that was running will run again; resume with the same command "
              f"(study folder {folder})", file=sys.stderr)
        return 130
    return 0 if "best" in out else 1


def cmd_report(args) -> int:
    """One self-contained HTML page about one or several runs (tunesmith/insight/report.py)."""
    import tunesmith as ts

    print(f"report: {ts.report(args.run_dirs, args.out, explain=not args.no_explain)}")
    return 0


def cmd_explain(args) -> int:
    """Token attributions / saliency for inputs and the most confident mistakes (tunesmith/insight/explain.py)."""
    import tunesmith as ts
    from tunesmith.insight.explain import write_html

    result = ts.explain(args.run_dir, args.inputs, mistakes=args.mistakes, device=args.device)
    if args.json:
        print(json.dumps(result))
    else:
        for e in result["inputs"] + result["mistakes"]:
            ranked = sorted(zip(e.get("tokens", []), e.get("attributions", [])), key=lambda x: -x[1])[:5]
            print(f"{e['predicted']} ({e['probability']:.3f})" + (f" label {e['label']}" if "label" in e else "")
                  + f": {e['input']}" + (f"  <- {', '.join(t for t, _ in ranked)}" if ranked else ""))
    print(f"explain: {write_html(result, args.out)}", file=sys.stderr if args.json else sys.stdout)


def cmd_export(args) -> int:
    """ONNX (and int8) files checked against the run's test split; 1 when a file fails the --max-drop gate."""
    import tunesmith as ts
    from tunesmith.deploy.export import render

    report = ts.export(args.run_dir, args.format, args.quantize, args.out, args.max_drop)
    print(render(report))
    return 0 if report.get("passed", True) else 1


def cmd_distill(args) -> int:
    """A smaller student trained on a classifier run's soft labels; prints size, speed and metric vs the teacher."""
    import tunesmith as ts
    from tunesmith.deploy.distill import render

    print(render(ts.distill(args.run_dir, args.student, run_dir=args.run_dir_out, overrides=args.overrides,
                            temperature=args.temperature, alpha=args.alpha)))
    return 0


def cmd_serve(args) -> int:
    """REST (+ OpenAI-compatible chat for generative runs) and a web page, until Ctrl-C."""
    import tunesmith as ts

    ts.serve(args.run_dir, host=args.host, port=args.port, api_key=args.api_key or os.environ.get("TUNESMITH_API_KEY"),
             onnx=args.onnx, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
             timeout_s=args.timeout, max_body=args.max_body, device=args.device)
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "demo": cmd_demo, "doctor": cmd_doctor,
            "compare": cmd_compare, "chat": cmd_chat, "report": cmd_report, "explain": cmd_explain,
            "export": cmd_export, "distill": cmd_distill, "serve": cmd_serve, "search": cmd_search, "cv": cmd_cv,
            "tune": cmd_tune}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tunesmith", description="Fine-tune pretrained models from a YAML recipe.")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="fine-tune as a recipe says")
    t.add_argument("recipe", nargs="?", help="recipe YAML file")
    t.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.epochs=1")
    t.add_argument("--run-dir", help="run folder (default runs/<name>-<time>)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its newest checkpoint")
    e = sub.add_parser("eval", help="metrics of a run's model as JSON")
    e.add_argument("run_dir")
    e.add_argument("--data", metavar="FILE", help="labelled rows to evaluate on (.jsonl .csv .parquet, as data.train "
                                                  "reads them; default: the run's test split)")
    e.add_argument("--device", default="auto", help="auto (GPU if any), cpu, cuda, cuda:1, ...")
    pr = sub.add_parser("predict", help="one JSON line per input")
    pr.add_argument("run_dir")
    pr.add_argument("inputs", nargs="*")
    pr.add_argument("--input", metavar="FILE", help="rows to predict (.jsonl .csv .parquet, as data.train reads them; "
                                                    "or .txt with one input per line)")
    pr.add_argument("--device", default="auto", help="auto (GPU if any), cpu, cuda, cuda:1, ...")
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
    se = _with_recipe(sub, "search", "hyperparameter search (Optuna TPE + pruning); resumes an interrupted study")
    se.add_argument("--trials", type=int, help="trials to finish (default search.trials)")
    se.add_argument("--budget", help="wall time, e.g. 20m; no trial starts after it")
    se.add_argument("--storage", help="Optuna storage URL (default: study.db in the study folder); "
                                      "postgresql://... shares one study between workers")
    se.add_argument("--study", help="study name (default: the recipe's name or task)")
    cv = _with_recipe(sub, "cv", "K-fold cross-validation (stratified; grouped by data.group_column)")
    cv.add_argument("--folds", type=int, default=5, help="K (default 5)")
    cv.add_argument("--repeats", type=int, default=1, help="repeat K-fold with other shuffles (default 1)")
    tu = _with_recipe(sub, "tune", "automated fine-tuning within a time budget (successive halving)")
    tu.add_argument("--budget", required=True, help="wall time, e.g. 15m")
    rp = sub.add_parser("report", help="an HTML report of one or several runs (curves, confusion, slices, ...)")
    rp.add_argument("run_dirs", nargs="+")
    rp.add_argument("--out", default="report.html", help="where to write the HTML (default ./report.html)")
    rp.add_argument("--no-explain", action="store_true", help="skip the explanations (they load each model)")
    ex = sub.add_parser("explain", help="why a run's model predicts what it does (attributions, saliency)")
    ex.add_argument("run_dir")
    ex.add_argument("inputs", nargs="*", help="texts or image paths to explain")
    ex.add_argument("--out", default="explain.html", help="where to write the HTML (default ./explain.html)")
    ex.add_argument("--json", action="store_true", help="print the explanations as one JSON object")
    ex.add_argument("--mistakes", type=int, default=5, help="most confident test mistakes to explain (default 5)")
    ex.add_argument("--device", default="auto", help="auto (GPU if any), cpu, cuda, cuda:1, ...")
    xp = sub.add_parser("export", help="ONNX (+ int8) checked on the run's test split against eval.json")
    xp.add_argument("run_dir")
    xp.add_argument("--format", default="onnx", choices=["onnx", "hf"], help="onnx, or hf (the merged HF folder)")
    xp.add_argument("--quantize", choices=["int8"], help="also write onnxruntime's dynamic int8 quantization")
    xp.add_argument("--out", help="folder (default RUN_DIR/export)")
    xp.add_argument("--max-drop", type=float, default=0.01,
                    help="fail when the test metric falls more than this below eval.json (default 0.01 = 1 point)")
    di = sub.add_parser("distill", help="train a smaller student on a classifier run's soft labels")
    di.add_argument("run_dir", help="the teacher run")
    di.add_argument("overrides", nargs="*", help="key.path=value overrides of the student's recipe, e.g. train.epochs=2")
    di.add_argument("--student", default="half", help="half (the teacher's bottom half of blocks), layers=N, or a "
                                                      "model (alias, folder) with the same tokenizer")
    di.add_argument("--run-dir", dest="run_dir_out", help="the student's run folder (default runs/<teacher>-student)")
    di.add_argument("--temperature", type=float, default=2.0, help="softmax temperature of the soft labels")
    di.add_argument("--alpha", type=float, default=0.5, help="weight of the soft-label loss (the rest: true labels)")
    sv = sub.add_parser("serve", help="REST API, OpenAI-compatible chat (generative runs) and a web page")
    sv.add_argument("run_dir")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but /health "
                                      "(or set TUNESMITH_API_KEY)")
    sv.add_argument("--onnx", nargs="?", const="fp32", choices=["fp32", "int8"],
                    help="serve the checked ONNX file from tunesmith export (classification)")
    sv.add_argument("--max-batch", type=int, default=8, help="inputs per forward pass (default 8)")
    sv.add_argument("--max-wait-ms", type=float, default=0.0,
                    help="how long a batch waits for more inputs (default 0: what queued while the last batch ran)")
    sv.add_argument("--max-queue", type=int, default=256, help="inputs waiting before requests get 503")
    sv.add_argument("--timeout", type=float, default=30.0, help="seconds before a request gets 504")
    sv.add_argument("--max-body", type=int, default=4_000_000, help="bytes a request body may have (413 above)")
    sv.add_argument("--device", default="auto", help="auto (GPU if any), cpu, cuda, ...")
    p.commands = sub.choices                        # name -> its parser, for parse()
    return p


def _with_recipe(sub, name: str, help: str) -> argparse.ArgumentParser:
    """A command taking RECIPE, key=value overrides and --dir (its folder, default runs/NAME-<recipe name>)."""
    x = sub.add_parser(name, help=help)
    x.add_argument("recipe", help="recipe YAML file")
    x.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.epochs=2")
    x.add_argument("--dir", help=f"{name} folder (default runs/{name}-<recipe name or task>)")
    return x


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Options, positionals and key=value overrides in any order (`train r.yaml --run-dir x a.b=c`); --debug
    anywhere."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    p = parser()
    if argv and argv[0] in COMMANDS:
        args = p.commands[argv[0]].parse_intermixed_args(argv[1:])
        args.command = argv[0]
    else:
        args = p.parse_args(argv)
    args.debug = debug
    return args


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse(argv)
    try:
        return COMMANDS[args.command](args)
    except safety.Interrupted as e:             # a checkpoint is committed: say how to continue
        print(e, file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    except TunesmithError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, RecipeError) else 1


if __name__ == "__main__":
    sys.exit(main())
