"""python -m rlspec.compare: same setup for every recipe, one table and one Pareto plot."""

import json

import pytest

from conftest import TINY_OVERRIDES
from rlspec.compare import comparison_rows, main, markdown_table, parse_argv
from rlspec.errors import ConfigError, RLSpecError


def test_parse_argv():
    recipes, out, overrides = parse_argv(["recipes=[grpo,dler]", "out=/tmp/x", "trainer.steps=3"])
    assert recipes == ["grpo", "dler"] and str(out) == "/tmp/x" and overrides == ["trainer.steps=3"]
    with pytest.raises(ConfigError, match="unknown recipe 'dlr'"):
        parse_argv(["recipes=[grpo,dlr]"])
    with pytest.raises(ConfigError, match="run_name is set per recipe"):
        parse_argv(["run_name=x"])


def _summary(acc0, tok0, acc1, tok1):
    def ev(a, t):
        return {"eval/accuracy": a, "eval/mean_tokens": t, "eval/mean_tokens_correct": t, "eval/truncation_rate": 0.0}

    return {"start": ev(acc0, tok0), "end": ev(acc1, tok1), "wall_seconds": 1.0}


def test_rows_use_the_shared_base_and_aes():
    base, rows = comparison_rows({"a": _summary(0.5, 100, 0.5, 50), "b": _summary(0.5, 100, 0.4, 100)})
    assert base["accuracy"] == 0.5
    assert rows[0]["aes"] == pytest.approx(0.5)  # dLen 0.5, dAcc 0
    assert rows[1]["aes"] == pytest.approx(-1.0)  # dLen 0, dAcc -0.2 -> -5 * 0.2
    assert "| `a` | 50.0% | 50.0 |" in markdown_table(base, rows)
    with pytest.raises(RLSpecError, match="different evaluation"):
        comparison_rows({"a": _summary(0.5, 100, 0.5, 50), "b": _summary(0.6, 100, 0.4, 100)})


@pytest.mark.slow
def test_compare_two_recipes_end_to_end(tiny_model_path, tmp_path, capsys):
    out = tmp_path / "cmp"
    main(["recipes=[grpo,dler]", f"out={out}", *TINY_OVERRIDES, "trainer.steps=1"])
    table = (out / "compare.md").read_text()
    assert "| start (base) |" in table and "| `grpo` |" in table and "| `dler` |" in table
    data = json.loads((out / "compare.json").read_text())
    assert [r["recipe"] for r in data["rows"]] == ["grpo", "dler"]
    assert (out / "pareto.png").stat().st_size > 1000
    for recipe in ("grpo", "dler"):
        assert (out / recipe / "summary.json").is_file()
