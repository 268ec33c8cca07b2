"""`tunesmith COMMAND ...`: a table from command name to function; each parses its arguments, makes one call to
the Python API (`import tunesmith as ts`) and prints what it returns. Defaults (folder names, budgets) are the
API's.

Exit codes: 0 success, 1 a problem with the data or the run, 2 a problem with the recipe or the command line,
130 Ctrl-C and 143 SIGTERM (training commits a checkpoint first).
"""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from tunesmith import io, safety
from tunesmith.cli_args import check, parse
from tunesmith.errors import TunesmithError
from tunesmith.recipe import RecipeError

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

    if not args.inputs and not args.input:
        raise RecipeError("command line", ["give inputs: tunesmith predict RUN_DIR \"text\" ... or --input FILE"])
    model = ts.Run(args.run_dir).load(args.device)
    if args.out and model.task.prediction != "boxes":
        raise RecipeError("command line", [f"--out draws boxes; this run's task predicts {model.task.prediction}"])
    if args.stream:                 # each argument's text to stderr as it is written; the JSON lines as before
        outs = []
        for x in args.inputs:
            outs.append(model.stream(x, lambda piece: print(piece, end="", file=sys.stderr, flush=True)))
            print(file=sys.stderr)
    else:
        outs = model.predict(list(args.inputs))
    results = [{**out, "input": f"argument {i + 1}"} if "error" in out else out for i, out in enumerate(outs)]
    results += model.predict_file(args.input) if args.input else []
    if not results:
        raise RecipeError("command line", [f"{args.input} holds no inputs"])
    for out in results:
        print(io.dumps(out))
    if args.out:
        draw_predictions([*args.inputs], results, args.out)
    bad = sum("error" in out for out in results)
    if bad:
        print(f"error: {bad} of {len(results)} input(s) could not be predicted (their lines hold \"error\")",
              file=sys.stderr)
    return 1 if bad else 0


def draw_predictions(inputs: list[str], results: list[dict], out: str) -> None:
    """predict --out: each image argument with its predicted boxes, as a PNG (several inputs: OUT-1.png, ...)."""
    from tunesmith.vision import draw_boxes

    drawn = [(x, r) for x, r in zip(inputs, results) if "error" not in r]
    for i, (image, result) in enumerate(drawn, 1):
        path = Path(out) if len(drawn) == 1 else Path(out).with_name(f"{Path(out).stem}-{i}{Path(out).suffix}")
        draw_boxes(image, result["boxes"]).save(path, format="PNG")
        print(f"boxes drawn on {image}: {path}", file=sys.stderr)


# demo -> (its recipe, the line printed after it; {run}: the run folder it trained)
DEMOS = {"text": ("rotten_tomatoes.yaml", 'next: tunesmith predict {run} "a gripping, funny film" · '
                                          'tunesmith report {run}'),
         "ner": ("reviews_ner.yaml", 'next: tunesmith predict {run} "Tom Hanks is wasted in this Boston '
                                     'thriller" · tunesmith report {run}')}


def cmd_demo(args) -> int:
    import tunesmith as ts

    recipe, hint = DEMOS[args.task]
    run = ts.train(ts.load_recipe(RECIPES / recipe, args.overrides), run_dir=args.run_dir)
    print(hint.format(run=shlex.quote(str(run.path))))      # quoted: the line is a command to paste
    return 0


def cmd_doctor(args) -> int:
    import tunesmith as ts
    from tunesmith.diagnosis.report import render

    recipe = ts.load_recipe(args.recipe, args.overrides)
    report = ts.doctor(recipe, out=args.out)
    print(render(report, recipe.doctor.listed))
    print(f"doctor.json: {args.out}")
    return 1 if report["blocking"] else 0


def cmd_compare(args) -> int:
    import tunesmith as ts
    from tunesmith.selection.compare import render

    print(render(ts.compare(args.run_dirs)))
    return 0


def cmd_cv(args) -> int:
    import tunesmith as ts

    out = ts.cross_validate(ts.load_recipe(args.recipe, args.overrides), args.dir, folds=args.folds,
                            repeats=args.repeats)
    print(f"cv folder: {out['folder']}")
    return 0


def cmd_tune(args) -> int:
    import tunesmith as ts

    out = ts.tune(ts.load_recipe(args.recipe, args.overrides), args.dir, budget=args.budget)
    return 0 if out["best"] else 1


def cmd_search(args) -> int:
    import tunesmith as ts

    out = ts.search(ts.load_recipe(args.recipe, args.overrides), args.dir, trials=args.trials, budget=args.budget,
                    storage=args.storage, study=args.study)
    return 0 if "best" in out else 1


def cmd_chat(args) -> int:
    from tunesmith.serving.repl import chat

    return chat(args.run_dir, args.max_new_tokens, args.context, args.system)


def cmd_report(args) -> int:
    import tunesmith as ts

    print(f"report: {ts.report(args.run_dirs, args.out, explain=not args.no_explain)}")
    return 0


def cmd_explain(args) -> int:
    import tunesmith as ts
    from tunesmith.insight.explain import write_html

    result = ts.explain(args.run_dir, args.inputs, mistakes=args.mistakes, device=args.device)
    if args.json:
        print(io.dumps(result))
    else:
        for e in result["inputs"] + result["mistakes"]:
            ranked = sorted(zip(e.get("tokens", []), e.get("attributions", [])), key=lambda x: -x[1])[:5]
            print(f"{e['predicted']} ({e['probability']:.3f})" + (f" label {e['label']}" if "label" in e else "")
                  + f": {e['input']}" + (f"  <- {', '.join(t for t, _ in ranked)}" if ranked else ""))
    print(f"explain: {write_html(result, args.out)}", file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_export(args) -> int:
    import tunesmith as ts
    from tunesmith.deploy.export import render

    report = ts.export(args.run_dir, args.format, args.quantize, args.out, args.max_drop)
    print(render(report))
    return 0 if report.get("passed", True) else 1


def cmd_distill(args) -> int:
    import tunesmith as ts
    from tunesmith.deploy.distill import render

    print(render(ts.distill(args.run_dir, args.student, run_dir=args.run_dir_out, overrides=args.overrides,
                            temperature=args.temperature, alpha=args.alpha)))
    return 0


def cmd_serve(args) -> int:
    import tunesmith as ts

    ts.serve(args.run_dir, host=args.host, port=args.port, api_key=args.api_key or os.environ.get("TUNESMITH_API_KEY"),
             onnx=args.onnx, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
             timeout_s=args.timeout, max_body=args.max_body, max_pixels=args.max_pixels, device=args.device)
    return 0


def cmd_federate(args) -> int:
    import tunesmith as ts

    run = ts.federate(ts.load_recipe(args.recipe, args.overrides), clients=args.clients, rounds=args.rounds,
                      partition=args.partition, fraction=args.fraction, strategy=args.strategy, mu=args.mu,
                      min_clients=args.min_clients, run_dir=args.run_dir, server=args.server, client=args.client,
                      shard=args.shard, wait_s=args.wait)
    if run is not None:
        print(f"next: tunesmith predict {run.path} ... · tunesmith report {run.path}")
    return 0


def cmd_init(args) -> int:
    import tunesmith as ts

    out = ts.init(args.data, task=args.task, model=args.model, out=None if args.out == "-" else args.out,
                  text_column=args.text_column, label_column=args.label_column, overrides=args.overrides,
                  force=args.force)
    print(out["text"], end="")
    if out["path"]:
        print(f"wrote {out['path']} ({out['task']}); next: tunesmith doctor {out['path']} · tunesmith train "
              f"{out['path']}", file=sys.stderr)
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "demo": cmd_demo, "doctor": cmd_doctor,
            "compare": cmd_compare, "chat": cmd_chat, "report": cmd_report, "explain": cmd_explain,
            "export": cmd_export, "distill": cmd_distill, "serve": cmd_serve, "search": cmd_search, "cv": cmd_cv,
            "tune": cmd_tune, "init": cmd_init, "federate": cmd_federate}

def quiet() -> None:
    """Hide transformers' load reports ("LOAD REPORT" tables) and its and huggingface_hub's progress bars
    ("Loading weights", "Writing model shards"): set through the environment, which the libraries read when
    they load (child processes too), and on them directly where they already have. A weight that matters is
    still reported in one line (tunesmith/tasks/hf.py); tunesmith's own bars stay."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging

        logging.set_verbosity_error()
        logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse(argv)
    if not args.verbose:
        quiet()
    try:
        check(args)
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
    except OSError as e:                        # a path the user named: a file where a folder goes, read-only, full
        if args.debug:
            raise
        print(f"error: {e.filename or 'a file'}: {e.strerror or e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
