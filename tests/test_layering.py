"""Layering, checked on the source (every import statement, at module level or inside a function):
the loop imports no task module; tasks import neither the CLI nor the loop nor the training entry point; the
recipe and the task schemas import no torch; nothing imports the CLI; and tunesmith's modules form no cycle."""
import ast
from pathlib import Path

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
            if mod == "tunesmith.loop" and dep.startswith("tunesmith.tasks"):
                bad.append(f"{mod} imports {dep}: the loop knows tasks only through the Task contract")
            if mod.startswith("tunesmith.tasks") and dep in ("tunesmith.cli", "tunesmith.loop", "tunesmith.pipeline"):
                bad.append(f"{mod} imports {dep}: tasks import neither the CLI nor the loop nor training")
            if dep == "tunesmith.cli" and mod != "tunesmith.__main__":
                bad.append(f"{mod} imports the CLI: the CLI is the top layer")
    for mod in ("tunesmith.recipe", "tunesmith.tasks.schema", "tunesmith.tasks", "tunesmith.errors"):
        reach, todo = set(), [mod]
        while todo:
            m = todo.pop()
            for i in imports(PKG.parent / (m.replace(".", "/") + ("/__init__.py" if m == "tunesmith.tasks" else ".py"))):
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
