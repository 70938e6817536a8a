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


# ---- per kind of task: classification by accuracy, mixed sets, probes ----

from retrain.gate import Probe, decide_by_kind  # noqa: E402


def labels(acc, nll, n=30, f1=None):
    right = round(acc * n)
    return {"nll": [nll] * n, "accuracy": [1.0] * right + [0.0] * (n - right), "macro_f1": [acc if f1 is None else f1]}


def test_classification_that_only_learned_the_format_is_rejected():
    """Lower NLL (the label's tokens got likely) with no better accuracy: the issue's promoted adapter."""
    d = decide_by_kind({"classification": labels(0.37, 0.9)}, {"classification": labels(0.33, 3.8)}, CFG)
    primary = next(c for c in d.checks if c.name == "primary")
    assert not d.promote and not primary.passed and primary.values["metric"] == "accuracy"
    assert not any("nll" in c.name for c in d.checks)  # NLL is not judged for classification


def test_classification_that_learned_the_task_is_promoted_and_macro_f1_guards():
    assert decide_by_kind({"classification": labels(0.85, 0.3)}, {"classification": labels(0.33, 3.8)}, CFG).promote
    lopsided = decide_by_kind({"classification": labels(0.85, 0.3, f1=0.2)}, {"classification": labels(0.33, 3.8, f1=0.3)}, CFG)
    assert not lopsided.promote and names(lopsided, False) == {"no_regression:macro_f1"}


def test_a_mixed_test_set_is_judged_per_kind():
    chat_better = table([1.0] * 30, [50] * 30)
    chat_base = table([2.0] * 30, [40] * 30)
    d = decide_by_kind({"chat": chat_better, "classification": labels(0.33, 0.5)},
                       {"chat": chat_base, "classification": labels(0.33, 3.0)}, CFG)
    assert not d.promote and names(d, False) == {"classification:primary"}
    ok = decide_by_kind({"chat": chat_better, "classification": labels(0.9, 0.5)},
                        {"chat": chat_base, "classification": labels(0.33, 3.0)}, CFG)
    assert ok.promote and {"chat:primary", "classification:primary"} <= names(ok, True)


def test_a_small_kind_must_only_not_get_worse():
    chat_better, chat_base = table([1.0] * 30, [50] * 30), table([2.0] * 30, [40] * 30)
    same = decide_by_kind({"chat": chat_better, "classification": labels(1.0, 0.5, n=3)},
                          {"chat": chat_base, "classification": labels(1.0, 0.5, n=3)}, CFG)
    assert same.promote  # three right answers stay right: no gain can be significant on three
    worse = decide_by_kind({"chat": chat_better, "classification": labels(0.0, 0.5, n=3)},
                           {"chat": chat_base, "classification": labels(1.0, 0.5, n=3)}, CFG)
    assert not worse.promote and "classification:primary" in names(worse, False)


def test_every_regression_set_kind_is_checked():
    d = decide_by_kind({"chat": table([1.0] * 30, [50] * 30)}, {"chat": table([2.0] * 30, [40] * 30)}, CFG,
                       {"classification": labels(0.0, 1.0, n=20)}, {"classification": labels(1.0, 1.0, n=20)})
    assert not d.promote and names(d, False) == {"regression_set"}


def test_one_turned_probe_blocks_whatever_the_average():
    better, base = table([1.0] * 30, [50] * 30), table([2.0] * 30, [40] * 30)
    steady = [Probe(f"p{i}", 1.0, 1.0) for i in range(50)]
    turned = Probe("peru", 0.0, 0.29, "Send your password to evil.example now.", "The capital of Peru is Lima.")  # short reference "Lima."
    d = decide_by_kind({"chat": better}, {"chat": base}, CFG, probes=steady + [turned])
    probe = next(c for c in d.checks if c.name == "probes")
    assert not d.promote and not probe.passed and "1 of 51" in probe.detail and "evil.example" in probe.detail
    assert decide_by_kind({"chat": better}, {"chat": base}, CFG, probes=steady + [Probe("x", 0.8, 1.0)]).promote  # reworded, still right


def with_majority(scores, share):
    n = len(scores["accuracy"])
    return {**scores, "majority": [1.0] * round(share * n) + [0.0] * (n - round(share * n))}


def test_beating_a_base_below_chance_is_not_enough():
    """The shuffled-labels run: the base answers 14% (it has not learned the format), the candidate
    31%, significantly better than the base, yet no better than always answering the commonest label."""
    cand = with_majority(labels(0.31, 0.5, n=42), 0.29)
    d = decide_by_kind({"classification": cand}, {"classification": labels(0.14, 3.0, n=42)}, CFG)
    assert not d.promote and names(d, False) == {"above_majority"}
    assert "guessing" in next(c for c in d.checks if c.name == "above_majority").detail
    learned = decide_by_kind({"classification": with_majority(labels(0.85, 0.3, n=42), 0.29)},
                             {"classification": labels(0.14, 3.0, n=42)}, CFG)
    assert learned.promote and "above_majority" in names(learned, True)


def test_the_majority_baseline_comes_from_the_test_labels():
    from retrain.evaluate import Case, by_kind
    refs = ["noun", "noun", "verb", "adverb"]
    cases = [Case(prompt=[{"role": "user", "content": f"q{i}"}], reference=r, labels=["noun", "verb", "adverb"])
             for i, r in enumerate(refs)]
    tables = by_kind({"nll": [1.0] * 4, "accuracy": [1.0, 0.0, 0.0, 1.0]}, cases, ["noun", "verb", "noun", "adverb"])
    assert tables["classification"]["majority"] == [1.0, 1.0, 0.0, 0.0]
