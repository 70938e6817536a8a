"""The promotion gate: a pure decision over per-example score tables, with its reasons.

Promote only if every check passes:
  1. the test set has at least `min_examples` examples;
  2. for each kind of task in the test set, the candidate beats the active version on that kind's
     primary metric, and a paired bootstrap over its test examples puts the lower bound of the
     improvement above zero. Classification is judged by accuracy on the label set (a lower NLL
     alone only says the answer format was learned); free text by `primary` (NLL by default). A
     kind with fewer than `min_examples` test examples (unless it is the largest) cannot show a
     significant gain, so it must only not get worse. A classification candidate must also beat
     always answering the test set's most common label, with the same bound;
  3. no other metric of a kind regresses by more than `tolerance` (relative to the active
     version's mean); for classification that is macro-F1;
  4. on the regression set (seed data and liked answers), each kind's primary metric does not get
     worse by more than `tolerance`, so the model does not forget what already worked;
  5. planted probes one by one: a probe the active version answers right and the candidate turns
     into something else blocks promotion, however well the rest of the regression set does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

# Lower is better for these; higher is better for every other metric.
LOWER_IS_BETTER = {"nll"}
# The primary metric of a kind of task, where it does not follow the settings.
KIND_PRIMARY = {"classification": "accuracy"}
# A per-example table of what a trivial predictor scores on the primary metric: for classification,
# always answering the most common label. Beating the active version is not enough when the active
# version is below that (a base model that has not learned the label format yet): noise can beat it.
KIND_BASELINE = {"classification": "majority"}
# Metrics a kind is not checked on: for classification the label's likelihood says nothing the
# accuracy does not (and drops as soon as the answer format is learned).
KIND_IGNORES = {"classification": {"nll", "majority"}}
# A probe "turns" when its score (accuracy, or token F1 of a free answer) falls below this share of the
# serving version's: relative, so a short reference ("Lima.") inside a longer right answer still counts.
PROBE_KEEP = 0.5


@dataclass(frozen=True)
class GateConfig:
    primary: str = "nll"
    min_examples: int = 20
    tolerance: float = 0.01
    bootstrap: int = 2000
    confidence: float = 0.95
    seed: int = 0


@dataclass
class Check:
    name: str
    passed: bool
    detail: str
    values: dict[str, Any] = field(default_factory=dict)


@dataclass
class Decision:
    promote: bool
    checks: list[Check]

    def reasons(self) -> list[dict[str, Any]]:
        return [asdict(c) for c in self.checks]

    def summary(self) -> str:
        failed = [c for c in self.checks if not c.passed]
        if not failed:
            return "promote: " + "; ".join(c.detail for c in self.checks)
        return "keep the active version: " + "; ".join(c.detail for c in failed)


Scores = dict[str, list[float]]  # metric -> per-example scores, aligned across the two versions


def gain(metric: str, candidate: np.ndarray, active: np.ndarray) -> np.ndarray:
    """Per-example improvement of the candidate: positive is better, whatever the metric's direction."""
    return active - candidate if metric in LOWER_IS_BETTER else candidate - active


def bootstrap_lower(diffs: np.ndarray, n: int, confidence: float, seed: int) -> float:
    """One-sided lower confidence bound of the mean paired difference."""
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, len(diffs), size=(n, len(diffs)))].mean(axis=1)
    return float(np.quantile(means, 1 - confidence))


def _regressed(metric: str, candidate: np.ndarray, active: np.ndarray, tolerance: float) -> tuple[bool, float, float]:
    drop = -float(gain(metric, candidate, active).mean())  # positive: the candidate is worse
    allowed = tolerance * max(abs(float(active.mean())), 1e-9)
    return drop > allowed, drop, allowed


def primary_for(kind: str, cfg: GateConfig) -> str:
    return KIND_PRIMARY.get(kind, cfg.primary)


@dataclass
class Probe:
    """One planted probe's score (accuracy or token F1) and answer under both versions."""

    ref: str
    candidate: float
    active: float
    candidate_answer: str = ""
    active_answer: str = ""


def decide(candidate: Scores, active: Scores, cfg: GateConfig,
           regression_candidate: Scores | None = None, regression_active: Scores | None = None) -> Decision:
    """One kind of task, judged on `cfg.primary`."""
    return decide_by_kind({"chat": candidate}, {"chat": active}, cfg,
                          {"chat": regression_candidate} if regression_candidate else None,
                          {"chat": regression_active} if regression_active else None)


def decide_by_kind(candidate: dict[str, Scores], active: dict[str, Scores], cfg: GateConfig,
                   regression_candidate: dict[str, Scores] | None = None, regression_active: dict[str, Scores] | None = None,
                   probes: Sequence[Probe] = ()) -> Decision:
    """Each kind of task (chat, classification) must pass on its own metrics; check names carry the
    kind when the test set mixes kinds."""
    kinds = sorted(k for k in candidate if candidate[k])
    if not kinds:
        return Decision(False, [Check("test_size", False, "the test set is empty", {"examples": 0, "minimum": cfg.min_examples})])
    mixed = len(kinds) > 1
    for kind in kinds:
        metric = primary_for(kind, cfg)
        if metric not in candidate[kind] or metric not in active.get(kind, {}):
            return Decision(False, [Check("primary_metric", False, f"primary metric {metric!r} was not measured for {kind} examples")])
        if len(active[kind][metric]) != len(candidate[kind][metric]):
            return Decision(False, [Check("aligned", False, f"score tables differ in length ({len(candidate[kind][metric])} "
                                                            f"vs {len(active[kind][metric])})")])
    n = sum(len(candidate[k][primary_for(k, cfg)]) for k in kinds)
    checks = [Check("test_size", n >= cfg.min_examples, f"test set has {n} examples (minimum {cfg.min_examples})",
                    {"examples": n, "minimum": cfg.min_examples})]
    size = {k: len(candidate[k][primary_for(k, cfg)]) for k in kinds}
    largest = max(kinds, key=lambda k: size[k])
    for kind in kinds:
        checks += judge(kind, candidate[kind], active[kind], cfg, f"{kind}:" if mixed else "",
                        must_improve=size[kind] >= cfg.min_examples or kind == largest)
    reg_kinds = sorted(set(regression_candidate or {}) | set(regression_active or {}))
    for kind in reg_kinds:
        rc, ra = (regression_candidate or {}).get(kind), (regression_active or {}).get(kind)
        metric = primary_for(kind, cfg)
        if rc and ra and rc.get(metric) and ra.get(metric):
            c, a = np.asarray(rc[metric], float), np.asarray(ra[metric], float)
            worse, drop, allowed = _regressed(metric, c, a, cfg.tolerance)
            checks.append(Check(f"{kind}:regression_set" if mixed or len(reg_kinds) > 1 else "regression_set", not worse,
                                f"regression set ({len(c)} {kind} examples) {metric}: candidate {c.mean():.4f} vs active {a.mean():.4f}"
                                + (f", worse by {drop:.4f} (> {allowed:.4f} allowed)" if worse else ""),
                                {"kind": kind, "examples": len(c), "candidate": float(c.mean()), "active": float(a.mean())}))
    if probes:
        turned = [p for p in probes if p.active > 0 and p.candidate < PROBE_KEEP * p.active]
        checks.append(Check("probes", not turned,
                            f"{len(turned)} of {len(probes)} planted probe(s) turned"
                            + "".join(f"; {p.ref}: {p.active_answer[:60]!r} -> {p.candidate_answer[:60]!r}" for p in turned[:5]),
                            {"probes": len(probes), "turned": [asdict(p) for p in turned]}))
    return Decision(all(ch.passed for ch in checks), checks)


def judge(kind: str, candidate: Scores, active: Scores, cfg: GateConfig, prefix: str = "", must_improve: bool = True) -> list[Check]:
    """The primary check (improvement with a bootstrap bound) and the no-regression checks of one kind."""
    metric = primary_for(kind, cfg)
    c, a = np.asarray(candidate[metric], float), np.asarray(active[metric], float)
    if not must_improve:
        worse, drop, allowed = _regressed(metric, c, a, cfg.tolerance)
        checks = [Check(f"{prefix}primary", not worse,
                        f"{prefix}{metric}: candidate {c.mean():.4f} vs active {a.mean():.4f} on {len(c)} examples, too few to "
                        f"require a gain (minimum {cfg.min_examples}); checked for no regression"
                        + (f", worse by {drop:.4f} (> {allowed:.4f} allowed)" if worse else ""),
                        {"kind": kind, "metric": metric, "candidate": float(c.mean()), "active": float(a.mean()), "required_gain": False})]
        return checks + no_regressions(kind, candidate, active, cfg, prefix, metric)
    diffs = gain(metric, c, a)
    lower = bootstrap_lower(diffs, cfg.bootstrap, cfg.confidence, cfg.seed) if len(diffs) else 0.0
    better = len(diffs) > 0 and diffs.mean() > 0 and lower > 0
    checks = [Check(f"{prefix}primary", bool(better),
                    f"{prefix}{metric}: candidate {c.mean():.4f} vs active {a.mean():.4f}, improvement "
                    f"{diffs.mean():+.4f} ({cfg.confidence:.0%} lower bound {lower:+.4f})",
                    {"kind": kind, "metric": metric, "candidate": float(c.mean()), "active": float(a.mean()),
                     "improvement": float(diffs.mean()), "lower_bound": lower})]
    baseline = KIND_BASELINE.get(kind)
    if baseline in candidate:
        checks.append(above_baseline(kind, c, np.asarray(candidate[baseline], float), cfg, prefix, metric, baseline))
    return checks + no_regressions(kind, candidate, active, cfg, prefix, metric)


def above_baseline(kind: str, c: np.ndarray, base: np.ndarray, cfg: GateConfig, prefix: str, metric: str, baseline: str) -> Check:
    """The candidate must beat the trivial predictor with the same paired bootstrap bound."""
    diffs = c - base
    lower = bootstrap_lower(diffs, cfg.bootstrap, cfg.confidence, cfg.seed) if len(diffs) else 0.0
    ok = len(diffs) > 0 and diffs.mean() > 0 and lower > 0
    return Check(f"{prefix}above_{baseline}", bool(ok),
                 f"{prefix}{metric}: candidate {c.mean():.4f} vs {base.mean():.4f} for always answering the most common label, "
                 f"{cfg.confidence:.0%} lower bound {lower:+.4f}" + ("" if ok else "; not better than guessing"),
                 {"kind": kind, "metric": metric, "candidate": float(c.mean()), "baseline": float(base.mean()), "lower_bound": lower})


def no_regressions(kind: str, candidate: Scores, active: Scores, cfg: GateConfig, prefix: str, metric: str) -> list[Check]:
    checks = []
    for other in sorted(set(candidate) & set(active) - {metric} - KIND_IGNORES.get(kind, set())):
        c, a = np.asarray(candidate[other], float), np.asarray(active[other], float)
        worse, drop, allowed = _regressed(other, c, a, cfg.tolerance)
        checks.append(Check(f"{prefix}no_regression:{other}", not worse,
                            f"{prefix}{other}: candidate {c.mean():.4f} vs active {a.mean():.4f}"
                            + (f", regressed by {drop:.4f} (> {allowed:.4f} allowed)" if worse else ""),
                            {"kind": kind, "metric": other, "candidate": float(c.mean()), "active": float(a.mean())}))
    return checks
