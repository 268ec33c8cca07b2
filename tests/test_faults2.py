"""Issue 20, part 2 (export, cv, tune, recipe, data): each user mistake is one line on stderr, exit 1 or 2, no
traceback, nothing half-written."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import recipe_dict, write_reviews

import tunesmith as ts
from tunesmith.cli import main
from tunesmith.errors import TunesmithError


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


def recipe_file(tmp_path: Path, data: Path | None = None, **sections) -> Path:
    """A recipe on a model folder that is never loaded: every check below comes before any model."""
    data = data or write_reviews(tmp_path / "r.csv", n=40)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(tmp_path / "no-model", data, **sections)))
    return path


# --- 6: export --max-drop -------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["nan", "-0.5", "inf", "-inf"])
def test_export_max_drop_must_be_a_finite_non_negative_number(tmp_path, capsys, value):
    assert main(["export", str(tmp_path / "run"), "--max-drop", value]) == 2
    assert "--max-drop" in one_line(capsys)
    with pytest.raises(TunesmithError, match="max_drop"):      # the API refuses it too, before reading the run
        ts.export(tmp_path / "run", max_drop=float(value))
