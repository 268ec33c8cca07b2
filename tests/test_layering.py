"""Layering, checked on the source (every import statement, at module level or inside a function):
the loop imports no task module; tasks import neither the CLI nor the loop nor the training entry point; the
recipe, the task schemas and the prediction schemas import no torch; nothing imports the CLI; and tunesmith's modules
form no cycle. And shared code (outside tunesmith/tasks/) never compares a value with a task's name: it reads what
the Task declares."""
import ast
from pathlib import Path

from tunesmith.tasks import BUILTIN

PKG = Path(__file__).parent.parent / "tunesmith"


def imports(path: Path) -> set[str]:
    """Every module `path` imports (absolute names; `from x import y` counts as x and x.y)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def graph(pkg: Path = PKG) -> dict[str, set[str]]:
    mods = {".".join(p.relative_to(pkg.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in pkg.rglob("*.py")}
    return {m: {i for i in imports(p) if i in mods and i != m} for m, p in mods.items()}


def violations(g: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, deps in g.items():
        for dep in deps:
            if mod in ("tunesmith.loop", "tunesmith.steps") and dep.startswith("tunesmith.tasks"):
                bad.append(f"{mod} imports {dep}: the loop knows tasks only through the Task contract")
            if mod.startswith("tunesmith.tasks") and dep in ("tunesmith.cli", "tunesmith.loop", "tunesmith.steps",
                                                             "tunesmith.pipeline"):
                bad.append(f"{mod} imports {dep}: tasks import neither the CLI nor the loop nor training")
            if dep == "tunesmith.cli" and mod != "tunesmith.__main__":
                bad.append(f"{mod} imports the CLI: the CLI is the top layer")
    recipe_modules = {ref.partition(":")[0] for ref in BUILTIN.values()}       # every built-in task's recipe
    for mod in ("tunesmith.recipe", "tunesmith.tasks", "tunesmith.tasks.outputs", "tunesmith.errors",
                *sorted(recipe_modules)):
        reach, todo = set(), [mod]
        while todo:
            m = todo.pop()
            path = PKG.parent / m.replace(".", "/")
            path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
            for i in imports(path):
                if i == "torch" or i.startswith("torch."):
                    bad.append(f"{mod} reaches torch (through {m}): reading a recipe must not import torch")
            for d in g.get(m, ()):
                if d not in reach:
                    reach.add(d)
                    todo.append(d)
    bad += [f"import cycle: {' -> '.join(c)}" for c in cycles(g)]
    return bad


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected group of modules (package __init__ re-exports aside)."""
    found, state = [], {}

    def visit(m, stack):
        state[m] = 1
        for d in sorted(g.get(m, ())):
            if d == "tunesmith":                     # the package's lazy re-export table
                continue
            if state.get(d) == 1:
                found.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    return found


def names_compared(pkg: Path = PKG, names=tuple(BUILTIN)) -> list[str]:
    """Places outside tunesmith/tasks/ that compare a value with a task name: `x == "causal-lm"`, `x in
    ("causal-lm", ...)`, `x != ...`, or a `case "causal-lm":` of a match statement."""
    def named(node) -> bool:
        if isinstance(node, ast.Constant):
            return node.value in names
        return isinstance(node, (ast.Tuple, ast.List, ast.Set)) and any(named(x) for x in node.elts)

    found = []
    for path in sorted(pkg.rglob("*.py")):
        if "tasks" in path.relative_to(pkg).parts[:-1]:
            continue                                  # a task may know its own name (and the table, all of them)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(named(x) for x in [node.left, *node.comparators]):
                found.append(f"{path.relative_to(pkg.parent)}:{node.lineno} compares with a task name")
            elif isinstance(node, ast.MatchValue) and named(node.value):
                found.append(f"{path.relative_to(pkg.parent)}:{node.lineno} matches a task name")
    return found


def test_layering_rules_hold():
    assert violations(graph()) == []


def test_layering_check_catches_a_task_importing_the_loop(tmp_path):
    """The check itself can fail: a copy of the package where a task imports the loop is caught."""
    import shutil

    copy = tmp_path / "tunesmith"
    shutil.copytree(PKG, copy, ignore=shutil.ignore_patterns("__pycache__"))
    task = copy / "tasks" / "text_classification.py"
    task.write_text(task.read_text() + "\n\ndef _f():\n    from tunesmith.loop import fit\n")
    assert any("imports tunesmith.loop" in v for v in violations(graph(copy)))


def test_shared_code_never_compares_a_task_name():
    assert names_compared() == []


def test_task_name_check_catches_a_comparison_in_shared_code(tmp_path):
    """The check itself can fail: comparisons with a task name injected into shared modules are each caught; the
    same inside a task module is allowed."""
    import shutil

    copy = tmp_path / "tunesmith"
    shutil.copytree(PKG, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert names_compared(copy) == []
    injected = {"serving/app.py": 'def _f(task):\n    return task.name == "causal-lm"\n',
                "insight/report.py": 'def _g(run):\n    return run["task"] in ("image-classification", "x")\n',
                "deploy/export.py": 'def _h(name):\n    match name:\n        case "text-classification":\n'
                                    '            return 1\n',
                "tasks/text_classification.py": 'def _i(name):\n    return name != "text-classification"\n'}
    for path, code in injected.items():
        (copy / path).write_text((copy / path).read_text() + "\n\n" + code)
    found = names_compared(copy)
    assert len(found) == 3, found
    assert [f.split(":")[0] for f in found] == ["tunesmith/deploy/export.py", "tunesmith/insight/report.py",
                                                "tunesmith/serving/app.py"]
    assert "matches a task name" in found[0] and "compares with a task name" in found[2]
