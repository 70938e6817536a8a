"""`make bench` ends each benchmark by printing its rows from bench/results/NAME.json; a result written by
the current benchmark must print. (A serving result without the old `b/a` target once stopped a whole
`make bench` after an hour of measuring.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import run  # noqa: E402  (bench/run.py: the table printer)


@pytest.mark.parametrize("name", list(run.BENCHMARKS))
def test_every_committed_result_prints_as_table_rows(name):
    result = json.loads((BENCH / "results" / f"{name}.json").read_text())
    rows = run.BENCHMARKS[name](result)
    assert rows, f"{name} printed nothing"
    for row in rows:  # | benchmark | figure | target |
        assert row.startswith(f"| {name}") and row.endswith("|") and row.count(" | ") >= 2, row


def test_a_serving_result_prints_its_c_over_a_target():
    result = json.loads((BENCH / "results" / "serving.json").read_text())
    rows = run.BENCHMARKS["serving"](result)
    assert any(f"c/a >= {result['targets']['c/a']}" in r for r in rows)
