"""The promotion gate: a pure decision over per-example score tables, with its reasons.

Promote only if every check passes:
  1. the test set has at least `min_examples` examples;
  2. the candidate beats the active version on the primary metric, and a paired bootstrap over
     test examples puts the lower bound of the improvement above zero;
  3. no other metric regresses by more than `tolerance` (relative to the active version's mean);
  4. on the regression set (seed data and liked answers), the primary metric does not get worse
     by more than `tolerance`, so the model does not forget what already worked.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np

# Lower is better for these; higher is better for every other metric.
LOWER_IS_BETTER = {"nll"}


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


def decide(candidate: Scores, active: Scores, cfg: GateConfig,
           regression_candidate: Optional[Scores] = None, regression_active: Optional[Scores] = None) -> Decision:
    checks: list[Check] = []
    n = len(candidate.get(cfg.primary, []))
    if cfg.primary not in candidate or cfg.primary not in active:
        return Decision(False, [Check("primary_metric", False, f"primary metric {cfg.primary!r} was not measured")])
    if len(active[cfg.primary]) != n:
        return Decision(False, [Check("aligned", False, f"score tables differ in length ({n} vs {len(active[cfg.primary])})")])
    checks.append(Check("test_size", n >= cfg.min_examples, f"test set has {n} examples (minimum {cfg.min_examples})",
                        {"examples": n, "minimum": cfg.min_examples}))
    if n:
        c, a = np.asarray(candidate[cfg.primary], float), np.asarray(active[cfg.primary], float)
        diffs = gain(cfg.primary, c, a)
        lower = bootstrap_lower(diffs, cfg.bootstrap, cfg.confidence, cfg.seed)
        better = diffs.mean() > 0 and lower > 0
        checks.append(Check("primary", bool(better),
                            f"{cfg.primary}: candidate {c.mean():.4f} vs active {a.mean():.4f}, improvement "
                            f"{diffs.mean():+.4f} ({cfg.confidence:.0%} lower bound {lower:+.4f})",
                            {"metric": cfg.primary, "candidate": float(c.mean()), "active": float(a.mean()),
                             "improvement": float(diffs.mean()), "lower_bound": lower}))
        for metric in sorted(set(candidate) & set(active) - {cfg.primary}):
            c, a = np.asarray(candidate[metric], float), np.asarray(active[metric], float)
            worse, drop, allowed = _regressed(metric, c, a, cfg.tolerance)
            checks.append(Check(f"no_regression:{metric}", not worse,
                                f"{metric}: candidate {c.mean():.4f} vs active {a.mean():.4f}"
                                + (f", regressed by {drop:.4f} (> {allowed:.4f} allowed)" if worse else ""),
                                {"metric": metric, "candidate": float(c.mean()), "active": float(a.mean())}))
    if regression_candidate and regression_active and regression_candidate.get(cfg.primary):
        c = np.asarray(regression_candidate[cfg.primary], float)
        a = np.asarray(regression_active[cfg.primary], float)
        worse, drop, allowed = _regressed(cfg.primary, c, a, cfg.tolerance)
        checks.append(Check("regression_set", not worse,
                            f"regression set ({len(c)} examples) {cfg.primary}: candidate {c.mean():.4f} vs active {a.mean():.4f}"
                            + (f", worse by {drop:.4f} (> {allowed:.4f} allowed)" if worse else ""),
                            {"examples": len(c), "candidate": float(c.mean()), "active": float(a.mean())}))
    return Decision(all(ch.passed for ch in checks), checks)
