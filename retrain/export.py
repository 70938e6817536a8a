"""Build the deduplicated dataset from the store and write it as JSONL in TRL's formats.

Every file comes with a manifest (FILE.manifest.json): row counts, the example and feedback ids
it was built from and the file's sha256, so a training run knows exactly what it trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.engine import Engine

from data_store.db import session
from data_store.errors import Refused
from data_store.models import Example, SplitKey
from retrain import dataset
from retrain.dataset import Item


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
    tmpl = dataset.template((t, it.chosen or it.rejected) for t, it in zip(texts, items) if it.source != PROBE)
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


def rows_for(items: list[Item], fmt: str) -> list[dict[str, Any]]:
    if fmt not in dataset.FORMATS:
        raise ValueError(f"format {fmt!r}; use one of {', '.join(dataset.FORMATS)}")
    make = dataset.FORMATS[fmt]
    return [row for it in items for row in make(it)]


def export(engine: Engine, fmt: str, split: str, out: Path, built: Built | None = None) -> dict[str, Any]:
    if split not in dataset.SPLITS:
        raise ValueError(f"split {split!r}; use one of {', '.join(dataset.SPLITS)}")
    built = built or build(engine)
    items = built.splits[split]
    rows = rows_for(items, fmt)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8", "surrogatepass")
    manifest = {
        "format": fmt, "split": split, "rows": len(rows), "file": out.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "example_ids": [it.id for it in items if dataset.FORMATS[fmt](it)],
        "feedback_ids": sorted(it.feedback_id for it in items if it.feedback_id is not None and dataset.FORMATS[fmt](it)),
        "created_at": datetime.now(UTC).isoformat(),
        "dataset": built.report(),
    }
    _atomic_write(out, data)
    _atomic_write(out.with_name(out.name + ".manifest.json"), json.dumps(manifest, indent=1).encode())
    return manifest


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
