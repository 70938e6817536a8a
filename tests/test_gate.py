"""The gate on hand-made score tables."""

import numpy as np

from retrain.gate import GateConfig, bootstrap_lower, decide

CFG = GateConfig(primary="nll", min_examples=20, tolerance=0.05, bootstrap=1000)


def table(nll, chrf):
    return {"nll": list(nll), "chrf": list(chrf)}


def names(decision, passed):
    return {c.name for c in decision.checks if c.passed is passed}


def test_clearly_better_candidate_is_promoted():
    active = table([2.0] * 30, [40.0] * 30)
    cand = table([1.0 + 0.01 * i for i in range(30)], [55.0] * 30)
    d = decide(cand, active, CFG)
    assert d.promote and names(d, False) == set()
    primary = next(c for c in d.checks if c.name == "primary")
    assert primary.values["lower_bound"] > 0 and primary.values["improvement"] > 0.5


def test_too_few_examples_blocks():
    d = decide(table([1.0] * 5, [60] * 5), table([2.0] * 5, [40] * 5), CFG)
    assert not d.promote and names(d, False) == {"test_size"}
    assert "5 examples (minimum 20)" in d.summary()


def test_worse_candidate_is_kept_out():
    d = decide(table([2.5] * 30, [40] * 30), table([2.0] * 30, [40] * 30), CFG)
    assert not d.promote and "primary" in names(d, False)


def test_noisy_tie_is_not_significant():
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 1, 30)
    active = table(2.0 + rng.normal(0, 0.1, 30), [40] * 30)
    cand = table(np.array(active["nll"]) - 0.01 + noise, [40] * 30)  # tiny mean gain, huge variance
    d = decide(cand, active, CFG)
    assert not d.promote and "primary" in names(d, False)


def test_secondary_regression_blocks():
    d = decide(table([1.0] * 30, [20] * 30), table([2.0] * 30, [40] * 30), CFG)
    assert not d.promote and names(d, False) == {"no_regression:chrf"}
    assert "regressed" in d.summary()


def test_regression_set_blocks_forgetting():
    better = table([1.0] * 30, [50] * 30)
    base = table([2.0] * 30, [40] * 30)
    d = decide(better, base, CFG, regression_candidate={"nll": [3.0] * 10}, regression_active={"nll": [1.0] * 10})
    assert not d.promote and names(d, False) == {"regression_set"}
    ok = decide(better, base, CFG, regression_candidate={"nll": [1.02] * 10}, regression_active={"nll": [1.0] * 10})
    assert ok.promote  # within 5% tolerance


def test_higher_is_better_primary():
    cfg = GateConfig(primary="chrf", min_examples=10, tolerance=0.05, bootstrap=500)
    d = decide({"chrf": [60.0] * 12}, {"chrf": [40.0] * 12}, cfg)
    assert d.promote


def test_missing_primary_or_misaligned():
    assert not decide({"chrf": [1.0]}, {"chrf": [1.0]}, CFG).promote
    assert not decide({"nll": [1.0, 2.0]}, {"nll": [1.0]}, CFG).promote


def test_bootstrap_bound_is_below_mean():
    diffs = np.array([0.5, 0.4, 0.6, 0.5, 0.45])
    assert 0 < bootstrap_lower(diffs, 2000, 0.95, 0) < diffs.mean()
