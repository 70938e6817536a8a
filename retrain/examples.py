"""The examples in the store: their frozen splits, the label set, and the deduplicated dataset.

The database side of the dataset stage; the pure parts (signatures, split choice, dedupe, row
formats) are in retrain/dataset.py. Splits are assigned per prompt once and never change (only
`tuneloop data resplit` moves them, under its own rules), so test prompts stay unseen in training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import func, insert, select
from sqlalchemy.engine import Engine

from data_store.db import session
from data_store.errors import Refused
from data_store.models import Example, LabelSet, SplitKey, now
from data_store.text import unstorable
from retrain import dataset
from retrain.dataset import Item


def known_labels(engine: Engine) -> set[str] | None:
    with session(engine) as s:
        labels = set(s.execute(select(LabelSet.label)).scalars().all())
    return labels or None


def declare_labels(engine: Engine, labels: list[str]) -> None:
    for lab in labels:
        if len(lab) > 200 or (problem := unstorable(lab)):
            raise ValueError(f"label {lab[:40]!r} {problem if len(lab) <= 200 else 'is longer than 200 characters'}")
    with session(engine) as s:
        have = set(s.execute(select(LabelSet.label)).scalars())
        for lab in dict.fromkeys(labels):
            if lab not in have:
                s.add(LabelSet(label=lab, source_ref="declared"))


def existing_hashes(s, hashes: list[str]) -> set[str]:
    found: set[str] = set()
    for i in range(0, len(hashes), 500):
        found |= set(s.execute(select(Example.content_hash).where(Example.content_hash.in_(hashes[i:i + 500]))).scalars())
    return found


def add(engine: Engine, splits: Splits, rows: list[dict[str, Any]], labels: dict[str, str]) -> None:
    """Add examples with their new split keys and labels (label -> where it was seen) in one transaction.
    Core inserts: the ORM's per-row bookkeeping is the slow part at 100k rows."""
    with session(engine) as s:
        conn = s.connection()
        if splits.new_rows:
            conn.execute(insert(SplitKey.__table__), splits.new_rows)
        if rows:
            conn.execute(insert(Example.__table__), rows)
        if labels:
            conn.execute(insert(LabelSet.__table__), [{"label": lab, "source_ref": ref} for lab, ref in labels.items()])


# Recent prompts that estimate the template, and that one approval is compared with: enough to
# see a template, few enough that an approval stays fast with 100,000 examples stored.
WINDOW = 5000


@dataclass
class Splits:
    of: dict[str, str]  # prompt key -> split, for every key asked about
    new_rows: list[dict[str, Any]]  # SplitKey rows to insert
    twins: dict[str, str] = field(default_factory=dict)  # new key -> the key whose split it inherited
    template: int = 0  # template bigrams left out of the comparison


def assign(engine: Engine, ratios: Sequence[float], prompts: dict[str, list[dict[str, str]]], answers: dict[str, str | None]) -> Splits:
    with session(engine) as s:
        return assign_in(s, ratios, prompts, answers, every_known=True)


def assign_in(s, ratios: Sequence[float], prompts: dict[str, list[dict[str, str]]], answers: dict[str, str | None],
              every_known: bool = False) -> Splits:
    """Known keys keep their split; new ones get one (inherited from a near-duplicate, else the
    split furthest below its share). A bulk import compares new prompts with every stored one; one
    approval with the WINDOW most recent (a dataset build still catches any older twin)."""
    if every_known:
        stored = s.execute(select(SplitKey.key, SplitKey.split, SplitKey.minhash)).all()
        known = {k: sp for k, sp, _ in stored}
    else:
        known = {}
        asked = list(prompts)
        for i in range(0, len(asked), 500):
            known.update(s.execute(select(SplitKey.key, SplitKey.split).where(SplitKey.key.in_(asked[i:i + 500]))).all())
    new_keys = [k for k in prompts if k not in known]
    if not new_keys:
        return Splits({k: known[k] for k in prompts}, [])
    if not every_known:
        stored = s.execute(select(SplitKey.key, SplitKey.split, SplitKey.minhash)
                           .order_by(SplitKey.created_at.desc()).limit(WINDOW)).all()
    recent = s.execute(select(Example.prompt, Example.chosen, Example.rejected).order_by(Example.id.desc()).limit(WINDOW)).all()
    texts = [dataset.prompt_text(prompts[k]) for k in new_keys]
    tmpl = dataset.template([*((dataset.prompt_text(p), c or r) for p, c, r in recent),
                             *zip(texts, (answers.get(k) for k in new_keys), strict=True)])
    sigs = dataset.signatures(texts, tmpl)
    counts = dict(s.execute(select(SplitKey.split, func.count()).group_by(SplitKey.split)).all())
    existing = ((k, sp, np.frombuffer(mh, dtype=np.uint32)) for k, sp, mh in stored)
    fresh = dataset.assign_splits(existing, list(zip(new_keys, sigs, strict=False)), ratios, counts)
    stamp = now()
    rows = [{"key": k, "split": fresh.split[k], "minhash": sig.tobytes(), "created_at": stamp}
            for k, sig in zip(new_keys, sigs, strict=True)]
    of = {k: known[k] if k in known else fresh.split[k] for k in prompts}
    return Splits(of, rows, fresh.twin, len(tmpl))


class LeakError(Refused):
    """409: a test prompt has a twin in train: evaluation on it would mean nothing."""

    status = 409


PROBE = "probe"  # Example.source of imported regression probes


@dataclass
class Built:
    splits: dict[str, list[Item]] = field(default_factory=dict)
    duplicates: dict[int, int] = field(default_factory=dict)  # dropped example id -> kept example id
    decontaminated: dict[int, int] = field(default_factory=dict)  # train/val id dropped -> its test twin
    probes: list[Item] = field(default_factory=list)  # regression probes: in no split, never trained on
    template_bigrams: int = 0  # left out of the near-duplicate comparison (the dataset's shared instruction)

    def report(self) -> dict[str, Any]:
        return {"examples": {k: len(v) for k, v in self.splits.items()}, "near_duplicates_dropped": len(self.duplicates),
                "decontaminated": len(self.decontaminated), "probes": len(self.probes), "template_bigrams": self.template_bigrams}


def load(engine: Engine) -> tuple[list[Item], np.ndarray, frozenset[str]]:
    """Every example with its frozen split, and signatures computed afresh under the template of the
    whole dataset as it is now (a stored signature used the template seen when it was assigned)."""
    with session(engine) as s:
        rows = s.execute(select(Example, SplitKey.split).join(SplitKey, SplitKey.key == Example.prompt_key)
                         .order_by(Example.id)).all()
    items = [Item(e.id, e.prompt, e.chosen, e.rejected, e.rating, sp, e.source, e.feedback_id, e.label, e.kind) for e, sp in rows]
    texts = [dataset.prompt_text(it.prompt) for it in items]
    tmpl = dataset.template((t, it.chosen or it.rejected) for t, it in zip(texts, items, strict=False) if it.source != PROBE)
    return items, dataset.signatures(texts, tmpl), tmpl


def build(engine: Engine) -> Built:
    """Dedupe within each split, decontaminate train and val against test, and prove test never
    leaks into train.

    Splits are frozen per prompt, and near-duplicates inherit the split of the first one seen; but a
    new prompt can be a near-duplicate of a train prompt and of a test prompt at once, and then no
    split is safe for it. The test set wins: such train/val items are left out and counted.
    """
    items, sigs, tmpl = load(engine)
    built = Built(probes=[it for it in items if it.source == PROBE], template_bigrams=len(tmpl))
    keep = [i for i, it in enumerate(items) if it.source != PROBE]
    items, sigs = [items[i] for i in keep], sigs[keep]
    kept_sigs = {}
    for name in dataset.SPLITS:
        idx = [i for i, it in enumerate(items) if it.split == name]
        kept, dropped = dataset.dedupe([items[i] for i in idx], sigs[idx] if idx else sigs[:0])
        built.splits[name] = kept
        built.duplicates.update(dropped)
        by_id = {items[i].id: sigs[i] for i in idx}
        kept_sigs[name] = np.stack([by_id[it.id] for it in kept]) if kept else sigs[:0]
    for name in ("train", "val"):
        # Index test, ask with every train/val item: each one with any test twin goes.
        contaminated = dict(dataset.overlap(built.splits["test"], kept_sigs["test"], built.splits[name], kept_sigs[name]))
        if contaminated:
            keep = [i for i, it in enumerate(built.splits[name]) if it.id not in contaminated]
            built.splits[name] = [built.splits[name][i] for i in keep]
            kept_sigs[name] = kept_sigs[name][keep]
            built.decontaminated.update(contaminated)
    check_no_leak(built, kept_sigs)
    return built


def check_no_leak(built: Built, sigs: dict[str, np.ndarray]) -> None:
    pairs = dataset.overlap(built.splits["train"], sigs["train"], built.splits["test"], sigs["test"])
    if pairs:
        shown = ", ".join(f"test {a} ~ train {b}" for a, b in pairs[:10])
        raise LeakError(f"{len(pairs)} test example(s) have a twin in train ({shown}); training refused")
