"""Re-assign frozen splits that an older near-duplicate rule assigned (`tuneloop data resplit`).

Before templates were recognized, every row of a templated file was a "near-duplicate" of the first one
seen and inherited its split, and "test wins" pushed the rest into test. This recomputes the splits under
today's rule (content bigrams, the split furthest below its share) and moves what it may:

- nothing moves into test: a train prompt there would be one the serving version learned, which biases
  the gate towards it;
- nothing moves from test into train, ever: a held-out prompt stays held out of training. A test
  prompt that no gate scored may move to val (never trained on either) when the rule puts it there;
  one a gate scored stays in test (runs record the test examples they scored; a run from before that
  record counts every example older than itself);
- everything else (train and val) moves to the split the rule gives it.

The plan is a pure function; `resplit` applies it in one transaction and reports every move.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from sqlalchemy import select, update
from sqlalchemy.engine import Engine

from data_store.db import session
from data_store.models import Example, SplitKey, TrainingRun
from retrain import dataset


def plan(current: dict[str, str], target: dict[str, str], scored: set[str]) -> dict[str, str]:
    """key -> new split, for the keys that move; `scored` are the test keys some gate scored."""
    def allowed(key: str, now: str, new: str) -> bool:
        if new in (now, "test"):
            return False
        return now != "test" or (new == "val" and key not in scored)
    return {key: target[key] for key, now in current.items() if allowed(key, now, target.get(key, now))}


def scored_test_keys(s, test_keys: set[str]) -> set[str]:
    """Test prompt keys that some cycle's evaluation may have scored."""
    ids: set[int] = set()
    before = None
    for started, used in s.execute(select(TrainingRun.started_at, TrainingRun.dataset)).all():
        if "test_example_ids" in (used or {}):
            ids.update(used["test_example_ids"])
        elif used:  # an older run that built a dataset but did not record what it scored
            before = max(before, started) if before else started
    q = select(Example.prompt_key).where(Example.prompt_key.in_(test_keys))
    keys = set(s.execute(q.where(Example.id.in_(ids))).scalars()) if ids else set()
    if before is not None:
        keys |= set(s.execute(q.where(Example.created_at <= before)).scalars())
    return keys


def target_splits(keys: Sequence[str], examples: Sequence[tuple[str, Any]], ratios: Sequence[float]) -> tuple[dict[str, str], np.ndarray]:
    """Splits as today's rule would assign these prompts from scratch, and their content signatures."""
    tmpl = dataset.template(examples)
    sigs = dataset.signatures([t for t, _ in examples], tmpl)
    return dataset.assign_splits([], list(zip(keys, sigs, strict=False)), ratios, {}).split, sigs


def resplit(engine: Engine, ratios: Sequence[float], apply: bool = True) -> dict[str, Any]:
    with session(engine) as s:
        current = dict(s.execute(select(SplitKey.key, SplitKey.split)).all())
        prompts = {k: (p, c or r) for k, p, c, r in s.execute(select(Example.prompt_key, Example.prompt, Example.chosen, Example.rejected)
                                                              .order_by(Example.id)).all()}
        scored = scored_test_keys(s, {k for k, sp in current.items() if sp == "test"})
    keys = [k for k in current if k in prompts]  # a key whose examples were all withdrawn has nothing to move
    target, sigs = target_splits(keys, [(dataset.prompt_text(prompts[k][0]), prompts[k][1]) for k in keys], ratios)
    moves = plan({k: current[k] for k in keys}, target, scored)
    held = sum(1 for k in keys if current[k] == "test" and target[k] != "test" and k not in moves)
    if apply:
        with session(engine) as s:  # every signature under today's template, so later imports compare alike
            for key, sig in zip(keys, sigs, strict=False):
                s.execute(update(SplitKey).where(SplitKey.key == key).values(split=moves.get(key, current[key]), minhash=sig.tobytes()))
    after = {**current, **moves}
    return {"prompts": len(keys), "before": dict(Counter(current[k] for k in keys)), "after": dict(Counter(after[k] for k in keys)),
            "moved": dict(Counter(f"{current[k]} -> {v}" for k, v in moves.items())),
            "kept_in_test": held, "applied": bool(apply)}
