"""Re-assign frozen splits that an older near-duplicate rule assigned (`tuneloop data resplit`).

Before templates were recognized, every row of a templated file was a "near-duplicate" of the first one
seen and inherited its split, and "test wins" pushed the rest into test. This recomputes the splits under
today's rule (content bigrams, the split furthest below its share) and moves what it may:

- a test prompt never moves into train: a gate already judged versions on it, and training on it now
  would make that judgement worthless (it may move to val, which is never trained on);
- everything else moves to the split the rule gives it.

The plan is a pure function; `resplit` applies it in one transaction and reports every move.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

import numpy as np
from sqlalchemy import select, update
from sqlalchemy.engine import Engine

from data_store.db import session
from data_store.models import Example, SplitKey
from retrain import dataset


def plan(current: dict[str, str], target: dict[str, str]) -> dict[str, str]:
    """key -> new split, for the keys that move."""
    moves = {}
    for key, now in current.items():
        want = target.get(key, now)
        if want == now or (now == "test" and want == "train"):
            continue
        moves[key] = want
    return moves


def target_splits(keys: Sequence[str], texts: Sequence[str], ratios: Sequence[float]) -> tuple[dict[str, str], np.ndarray]:
    """Splits as today's rule would assign these prompts from scratch, and their content signatures."""
    tmpl = dataset.template(texts)
    sigs = dataset.signatures(list(texts), tmpl)
    return dataset.assign_splits([], list(zip(keys, sigs)), ratios, {}).split, sigs


def resplit(engine: Engine, ratios: Sequence[float], apply: bool = True) -> dict[str, Any]:
    with session(engine) as s:
        current = dict(s.execute(select(SplitKey.key, SplitKey.split)).all())
        prompts = {k: p for k, p in s.execute(select(Example.prompt_key, Example.prompt).order_by(Example.id)).all()}
    keys = [k for k in current if k in prompts]  # a key whose examples were all withdrawn has nothing to move
    target, sigs = target_splits(keys, [dataset.prompt_text(prompts[k]) for k in keys], ratios)
    moves = plan({k: current[k] for k in keys}, target)
    held = sum(1 for k in keys if current[k] == "test" and target[k] == "train")
    if apply and moves:
        with session(engine) as s:
            sig_of = dict(zip(keys, sigs))
            for key, split in moves.items():
                s.execute(update(SplitKey).where(SplitKey.key == key).values(split=split, minhash=sig_of[key].tobytes()))
    after = {**current, **moves}
    return {"prompts": len(keys), "before": dict(Counter(current[k] for k in keys)), "after": dict(Counter(after[k] for k in keys)),
            "moved": dict(Counter(f"{current[k]} -> {v}" for k, v in moves.items())),
            "kept_in_test": held, "applied": bool(apply)}
