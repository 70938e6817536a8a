"""From curated examples to training data: keys, near-duplicates, frozen splits, TRL rows.

Pure functions over plain data; the database side lives in retrain/importer.py and retrain/export.py.

Near-duplicates: two prompts are near-duplicates when the estimated Jaccard similarity of their
word-bigram shingles (after lower-casing and dropping punctuation) is at least NEAR_DUP_THRESHOLD,
estimated with a 64-permutation MinHash and found with LSH (8 bands of 8 rows).
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import numpy as np

NEAR_DUP_THRESHOLD = 0.8
NUM_PERM, BANDS, ROWS = 64, 8, 8
SPLITS = ("train", "val", "test")


def key_text(text: str) -> str:
    """Lower-case, punctuation and symbols dropped, whitespace collapsed: what 'the same' compares."""
    kept = "".join(" " if unicodedata.category(c)[0] in "PSZC" else c for c in text.casefold())
    return " ".join(kept.split())


def prompt_text(prompt: Sequence[dict[str, str]]) -> str:
    return "\n".join(m["content"] for m in prompt)


def prompt_key(prompt: Sequence[dict[str, str]]) -> str:
    return hashlib.sha1(key_text(prompt_text(prompt)).encode()).hexdigest()


def content_hash(prompt: Any, chosen: Optional[str], rejected: Optional[str], label: Optional[str], kind: str) -> str:
    blob = json.dumps([prompt, chosen, rejected, label, kind], ensure_ascii=False, sort_keys=True)
    return hashlib.sha1(blob.encode("utf-8", "surrogatepass")).hexdigest()


def shingles(text: str) -> list[bytes]:
    words = key_text(text).split()
    grams = [" ".join(words[i:i + 2]) for i in range(len(words) - 1)] or words or [""]
    return [g.encode("utf-8", "surrogatepass") for g in set(grams)]


def signatures(texts: Sequence[str]) -> np.ndarray:
    """MinHash signatures, one uint32 row per text (datasketch computes them in bulk)."""
    from datasketch import MinHash

    if not texts:
        return np.zeros((0, NUM_PERM), dtype=np.uint32)
    mhs = MinHash.bulk([shingles(t) for t in texts], num_perm=NUM_PERM, seed=1)
    return np.stack([m.hashvalues for m in mhs]).astype(np.uint32)


def split_of(key: str, ratios: Sequence[float]) -> str:
    """Stable bucket from the key's hash: the same prompt lands in the same split on every machine."""
    u = int(key[:12], 16) / float(1 << 48)
    edge = 0.0
    for name, r in zip(SPLITS, ratios):
        edge += r
        if u < edge:
            return name
    return SPLITS[-1]


class NearDupIndex:
    """LSH over MinHash signatures; candidates are confirmed by the estimated Jaccard."""

    def __init__(self) -> None:
        self.buckets: dict[tuple[int, bytes], list[int]] = defaultdict(list)
        self.sigs: list[np.ndarray] = []
        self.tags: list[Any] = []

    def add(self, sig: np.ndarray, tag: Any) -> int:
        i = len(self.sigs)
        self.sigs.append(sig)
        self.tags.append(tag)
        for b in range(BANDS):
            self.buckets[(b, sig[b * ROWS:(b + 1) * ROWS].tobytes())].append(i)
        return i

    def match(self, sig: np.ndarray) -> Optional[int]:
        """Index of the first stored signature similar enough to sig, or None."""
        seen: set[int] = set()
        for b in range(BANDS):
            for i in self.buckets.get((b, sig[b * ROWS:(b + 1) * ROWS].tobytes()), ()):
                if i not in seen:
                    seen.add(i)
                    if float(np.mean(self.sigs[i] == sig)) >= NEAR_DUP_THRESHOLD:
                        return i
        return None


def assign_splits(existing: Iterable[tuple[str, str, np.ndarray]], new: Sequence[tuple[str, np.ndarray]],
                  ratios: Sequence[float]) -> dict[str, str]:
    """Splits for new prompt keys. A near-duplicate of a known prompt inherits its split, so a test
    prompt never has a twin in train; known keys never move (they are not in `new`)."""
    index = NearDupIndex()
    for key, split, sig in existing:
        index.add(sig, split)
    out: dict[str, str] = {}
    for key, sig in new:
        if key in out:
            continue
        hit = index.match(sig)
        out[key] = index.tags[hit] if hit is not None else split_of(key, ratios)
        index.add(sig, out[key])
    return out


@dataclass
class Item:
    """What dedupe and export need of an example."""

    id: int
    prompt: list[dict[str, str]]
    chosen: Optional[str]
    rejected: Optional[str]
    rating: int
    split: str
    source: str
    feedback_id: Optional[int] = None
    label: Optional[str] = None
    kind: str = "chat"


def dedupe(items: Sequence[Item], sigs: np.ndarray) -> tuple[list[Item], dict[int, int]]:
    """Collapse exact and near-duplicate prompts to one example each, keeping the best-rated
    (then feedback over imports, then the newest). Returns the kept items and dropped id -> kept id."""
    order = sorted(range(len(items)), key=lambda i: (-items[i].rating, items[i].source != "feedback", -items[i].id))
    index = NearDupIndex()
    kept: list[Item] = []
    dropped: dict[int, int] = {}
    for i in order:
        hit = index.match(sigs[i])
        if hit is None:
            index.add(sigs[i], items[i].id)
            kept.append(items[i])
        else:
            dropped[items[i].id] = index.tags[hit]
    kept.sort(key=lambda it: it.id)
    return kept, dropped


def overlap(train: Sequence[Item], train_sigs: np.ndarray, test: Sequence[Item], test_sigs: np.ndarray) -> list[tuple[int, int]]:
    """(test id, train id) pairs whose prompts are the same or near-duplicates; must be empty."""
    index = NearDupIndex()
    for it, sig in zip(train, train_sigs):
        index.add(sig, it.id)
    return [(it.id, index.tags[hit]) for it, sig in zip(test, test_sigs) if (hit := index.match(sig)) is not None]


# ---- TRL dataset formats ----

def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def sft_rows(it: Item) -> list[dict[str, Any]]:
    """Conversational language modeling: {"messages": [...]}; needs a good answer."""
    return [{"messages": [*it.prompt, *_assistant(it.chosen)]}] if it.chosen else []


def dpo_rows(it: Item) -> list[dict[str, Any]]:
    """Conversational preference: {"prompt", "chosen", "rejected"}; a correction beats the original."""
    if it.chosen and it.rejected:
        return [{"prompt": it.prompt, "chosen": _assistant(it.chosen), "rejected": _assistant(it.rejected)}]
    return []


def kto_rows(it: Item) -> list[dict[str, Any]]:
    """Unpaired preference: {"prompt", "completion", "label"}; thumbs become labels."""
    rows = []
    if it.chosen:
        rows.append({"prompt": it.prompt, "completion": _assistant(it.chosen), "label": True})
    if it.rejected:
        rows.append({"prompt": it.prompt, "completion": _assistant(it.rejected), "label": False})
    return rows


FORMATS = {"sft": sft_rows, "dpo": dpo_rows, "kto": kto_rows}
