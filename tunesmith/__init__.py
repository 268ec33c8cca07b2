"""tunesmith: fine-tune pretrained models from a short YAML recipe (or this Python API).

    import tunesmith as ts
    recipe = ts.load_recipe("recipe.yaml", overrides=["train.epochs=1"])   # typed; never changes its input
    run = ts.train(recipe, run_dir="runs/try1")                             # a Run; run.metrics = eval.json
    model = ts.Run("runs/try1").load(device="auto")                         # .predict(x), .predict_file(f), .evaluate()
    ts.report(["runs/try1"], "report.html")                                 # HTML: curves, confusion, slices, ...
    ts.explain("runs/try1", ["a gripping film"])                            # attributions (the explain extra)
    ts.doctor("recipe.yaml")                                                # data problems; writes doctor.json
    ts.cross_validate(recipe, folds=5)                                      # runs/cv-<name>: cv.json, oof.jsonl
    ts.search(recipe, trials=20)                                            # Optuna study in runs/search-<name>
    ts.tune(recipe, budget="15m")                                           # plan and race in runs/tune-<name>
    ts.compare(["runs/a", "runs/b"])                                        # metrics side by side (cv: paired test)
    ts.init("reviews.csv", out="recipe.yaml")                               # a starter recipe from the data alone
    ts.federate(recipe, clients=4, rounds=5, partition="dirichlet:0.3")     # federated on Flower: a run folder

Where a function takes a recipe, it takes a Recipe or what load_recipe reads (a YAML path, a dict). Names are
imported on first use, so `import tunesmith` stays light (no torch until something trains). An API name never
equals a subpackage's (importing tunesmith.diagnosis would set ts.diagnosis over it): ts.doctor lives in
tunesmith.diagnosis.diagnose, ts.search in tunesmith.selection.search.
"""
from __future__ import annotations

import importlib

__version__ = "0.2.0"

_API = {
    "load_recipe": "tunesmith.recipe:load",
    "Recipe": "tunesmith.recipe:Recipe",
    "RecipeError": "tunesmith.recipe:RecipeError",
    "TunesmithError": "tunesmith.errors:TunesmithError",
    "DataError": "tunesmith.data:DataError",
    "train": "tunesmith.pipeline:train",
    "Run": "tunesmith.run:Run",
    "Predictor": "tunesmith.run:Predictor",
    "Callback": "tunesmith.run:Callback",
    "StopTraining": "tunesmith.run:StopTraining",
    "Task": "tunesmith.tasks.base:Task",
    "register_task": "tunesmith.tasks:register_task",
    "report": "tunesmith.insight.report:write_report",
    "explain": "tunesmith.insight.explain:explain",
    "export": "tunesmith.deploy.export:export",
    "distill": "tunesmith.deploy.distill:distill",
    "serve": "tunesmith.serving.app:serve",
    "create_app": "tunesmith.serving.app:create_app",
    "doctor": "tunesmith.diagnosis.diagnose:doctor",
    "cross_validate": "tunesmith.selection.cv:cross_validate",
    "search": "tunesmith.selection.search:search",
    "tune": "tunesmith.selection.tune:tune",
    "compare": "tunesmith.selection.compare:compare",
    "init": "tunesmith.starter:init",
    "federate": "tunesmith.federated:federate",
}
__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'tunesmith' has no attribute '{name}'")
    module, _, attr = _API[name].partition(":")
    return getattr(importlib.import_module(module), attr)
