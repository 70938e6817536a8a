"""From curated examples to training data: keys, near-duplicates, frozen splits, TRL rows.

Pure functions over plain data; the database side lives in retrain/importer.py and retrain/export.py.

Near-duplicates are the same content, not the same template. A prompt's shingles are its word
bigrams (after case-folding and dropping punctuation); the template is every shingle that at least
TEMPLATE_SHARE of the distinct prompts (and at least TEMPLATE_MIN_PROMPTS of them) share, unless
nearly all of those prompts want one answer: the fixed instruction of templated data says nothing
about which example it is. Two prompts are near-duplicates
when the Jaccard similarity of what remains (their content shingles) is at least NEAR_DUP_THRESHOLD,
estimated with a 64-permutation MinHash and found with LSH (8 bands of 8 rows). A prompt made of
template shingles only is compared on all of its shingles.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

NEAR_DUP_THRESHOLD = 0.8
TEMPLATE_SHARE = 0.002  # of 100,000 prompts: 200, so a file of a few hundred templated rows is seen among them
TEMPLATE_MIN_PROMPTS = 10
TEMPLATE_ONE_ANSWER = 0.9  # prompts sharing a shingle that (nearly) all want one answer are one question
NUM_PERM, BANDS, ROWS = 64, 8, 8
SPLITS = ("train", "val", "test")


_NON_WORD = re.compile(r"[\W_]+")


def key_text(text: str) -> str:
    """Case-folded, with punctuation, symbols and invisible characters dropped and whitespace
    collapsed: what 'the same prompt' compares."""
    return _NON_WORD.sub(" ", text.casefold()).strip()


def prompt_text(prompt: Sequence[dict[str, str]]) -> str:
    return "\n".join(m["content"] for m in prompt)


def prompt_key(prompt: Sequence[dict[str, str]]) -> str:
    return hashlib.sha1(key_text(prompt_text(prompt)).encode()).hexdigest()


def content_hash(prompt: Any, chosen: str | None, rejected: str | None, label: str | None, kind: str) -> str:
    blob = json.dumps([prompt, chosen, rejected, label, kind], ensure_ascii=False, sort_keys=True)
    return hashlib.sha1(blob.encode("utf-8", "surrogatepass")).hexdigest()


def shingles(text: str) -> set[str]:
    words = key_text(text).split()
    return {f"{a} {b}" for a, b in zip(words, words[1:], strict=False)} or set(words) or {""}


def template(examples: Iterable[tuple[str, str | None]]) -> frozenset[str]:
    """The shingles that templated data repeats in every example, from (prompt text, answer) pairs.

    A shingle is template when at least TEMPLATE_SHARE of the distinct prompts (and at least
    TEMPLATE_MIN_PROMPTS of them) contain it, and those prompts do not all want the same answer: one
    question asked in many wordings has one answer (then its wordings stay near-duplicates), while a
    template's rows have many (the label, the extracted record).
    """
    rows: dict[str, tuple[set[str], str]] = {}
    for text, answer in examples:
        rows.setdefault(key_text(text), (shingles(text), key_text(answer or "")))
    if len(rows) < TEMPLATE_MIN_PROMPTS:
        return frozenset()
    df = Counter(g for sh, _ in rows.values() for g in sh)
    cut = max(TEMPLATE_MIN_PROMPTS, TEMPLATE_SHARE * len(rows))
    frequent = {g for g, n in df.items() if n >= cut}
    answers: dict[str, Counter] = {g: Counter() for g in frequent}
    for sh, answer in rows.values():
        for g in sh & frequent:
            answers[g][answer] += 1
    return frozenset(g for g in frequent if answers[g].most_common(1)[0][1] <= TEMPLATE_ONE_ANSWER * df[g])


def content(text: str, tmpl: frozenset[str] = frozenset()) -> set[str]:
    """The shingles that tell this prompt from the others; all of them if the template covers it."""
    every = shingles(text)
    return (every - tmpl) or every


_PRIME = np.uint64((1 << 61) - 1)
_rng = np.random.RandomState(1)
_A = _rng.randint(1, 1 << 31, NUM_PERM).astype(np.uint64)[:, None]
_B = _rng.randint(0, 1 << 31, NUM_PERM).astype(np.uint64)[:, None]


def signatures(texts: Sequence[str], tmpl: frozenset[str] = frozenset(), chunk: int = 4096) -> np.ndarray:
    """MinHash signatures of the content shingles, one uint32 row per text: min over shingles of
    (a*h + b) mod p for 64 (a, b) pairs, vectorized over a chunk of texts at a time (about 20x
    datasketch's bulk here)."""
    out = np.zeros((len(texts), NUM_PERM), dtype=np.uint32)
    for start in range(0, len(texts), chunk):
        sets = [content(t, tmpl) for t in texts[start:start + chunk]]
        sizes = np.fromiter((len(x) for x in sets), dtype=np.int64, count=len(sets))
        # A stable 32-bit hash per shingle (Python's hash() is salted per process, so unusable here).
        h = np.fromiter((int.from_bytes(hashlib.blake2b(g.encode("utf-8", "surrogatepass"), digest_size=4).digest(), "little")
                         for x in sets for g in x), dtype=np.uint64, count=int(sizes.sum()))
        perm = ((_A * h[None, :] + _B) % _PRIME) & np.uint64(0xFFFFFFFF)
        offsets = np.concatenate(([0], np.cumsum(sizes)[:-1]))
        out[start:start + len(sets)] = np.minimum.reduceat(perm, offsets, axis=1).T.astype(np.uint32)
    return out


def next_split(counts: dict[str, int], ratios: Sequence[float]) -> str:
    """The split furthest below its share once one more prompt is added: counts track the ratios
    within one prompt, so N distinct prompts split 80/10/10 however small N is."""
    total = sum(counts.values()) + 1
    return max(SPLITS, key=lambda sp: (ratios[SPLITS.index(sp)] * total - counts.get(sp, 0), -SPLITS.index(sp)))


_MIX = np.random.RandomState(2).randint(1, 1 << 62, ROWS, dtype=np.int64).astype(np.uint64) | np.uint64(1)


def band_keys(sigs: np.ndarray) -> list[list[int]]:
    """LSH band keys for many signatures in one numpy pass: one 64-bit mix of each band's rows."""
    if not len(sigs):
        return []
    rows = sigs.reshape(len(sigs), BANDS, ROWS).astype(np.uint64)
    with np.errstate(over="ignore"):  # wrap-around is the point of the mix
        return (rows * _MIX).sum(axis=2, dtype=np.uint64).tolist()


class NearDupIndex:
    """LSH over MinHash signatures; candidates are confirmed by the estimated Jaccard."""

    def __init__(self, capacity: int = 1024) -> None:
        self.buckets: list[dict[int, list[int]]] = [{} for _ in range(BANDS)]
        self.sigs = np.zeros((capacity, NUM_PERM), dtype=np.uint32)
        self.tags: list[Any] = []

    def add(self, sig: np.ndarray, tag: Any, keys: list[int] | None = None) -> int:
        i = len(self.tags)
        if i == len(self.sigs):
            self.sigs = np.concatenate([self.sigs, np.zeros_like(self.sigs)])
        self.sigs[i] = sig
        self.tags.append(tag)
        for bucket, k in zip(self.buckets, keys if keys is not None else band_keys(sig[None])[0], strict=False):
            bucket.setdefault(k, []).append(i)
        return i

    def add_many(self, sigs: np.ndarray, tags: Sequence[Any]) -> None:
        for sig, tag, keys in zip(sigs, tags, band_keys(sigs), strict=False):
            self.add(sig, tag, keys)

    def match(self, sig: np.ndarray, keys: list[int] | None = None) -> int | None:
        """Index of the most similar stored signature at or above the threshold, or None."""
        cands: set[int] = set()
        for bucket, k in zip(self.buckets, keys if keys is not None else band_keys(sig[None])[0], strict=False):
            hit = bucket.get(k)
            if hit:
                cands.update(hit)
        if not cands:
            return None
        idx = np.fromiter(cands, dtype=np.int64, count=len(cands))
        sim = (self.sigs[idx] == sig).mean(axis=1)
        best = int(sim.argmax())
        return int(idx[best]) if sim[best] >= NEAR_DUP_THRESHOLD else None


@dataclass
class Assigned:
    split: dict[str, str]  # new prompt key -> split
    twin: dict[str, Any]  # new prompt key -> the key of the near-duplicate whose split it inherited


def assign_splits(existing: Iterable[tuple[str, str, np.ndarray]], new: Sequence[tuple[str, np.ndarray]],
                  ratios: Sequence[float], counts: dict[str, int]) -> Assigned:
    """Splits for new prompt keys (known keys never move; they are not in `new`).

    A near-duplicate of a known or earlier new prompt inherits its split, so a test prompt never has
    a twin in train. Every other prompt, taken in the order of its key's hash (a stable shuffle), goes
    to the split furthest below its share of `counts` (prompts per split so far, updated here).
    """
    counts = dict(counts)
    index = NearDupIndex()
    old = list(existing)
    if old:
        index.add_many(np.stack([sig for _, _, sig in old]), [key for key, _, _ in old])
    split_of_key = {key: split for key, split, _ in old}
    out = Assigned({}, {})
    order = sorted(range(len(new)), key=lambda i: new[i][0])
    keys = band_keys(np.stack([sig for _, sig in new])) if new else []
    for i in order:
        key, sig = new[i]
        if key in out.split:
            continue
        hit = index.match(sig, keys[i])
        if hit is not None:
            out.twin[key] = index.tags[hit]
            out.split[key] = split_of_key[index.tags[hit]]
        else:
            out.split[key] = next_split(counts, ratios)
        counts[out.split[key]] = counts.get(out.split[key], 0) + 1
        split_of_key[key] = out.split[key]
        index.add(sig, key, keys[i])
    return out


@dataclass
class Item:
    """What dedupe and export need of an example."""

    id: int
    prompt: list[dict[str, str]]
    chosen: str | None
    rejected: str | None
    rating: int
    split: str
    source: str
    feedback_id: int | None = None
    label: str | None = None
    kind: str = "chat"


def dedupe(items: Sequence[Item], sigs: np.ndarray) -> tuple[list[Item], dict[int, int]]:
    """Collapse exact and near-duplicate prompts to one example each, keeping the best-rated
    (then feedback over imports, then the newest). Returns the kept items and dropped id -> kept id."""
    order = sorted(range(len(items)), key=lambda i: (-items[i].rating, items[i].source != "feedback", -items[i].id))
    index = NearDupIndex()
    kept: list[Item] = []
    dropped: dict[int, int] = {}
    keys = band_keys(sigs)
    for i in order:
        hit = index.match(sigs[i], keys[i])
        if hit is None:
            index.add(sigs[i], items[i].id, keys[i])
            kept.append(items[i])
        else:
            dropped[items[i].id] = index.tags[hit]
    kept.sort(key=lambda it: it.id)
    return kept, dropped


def overlap(indexed: Sequence[Item], indexed_sigs: np.ndarray, queries: Sequence[Item], query_sigs: np.ndarray) -> list[tuple[int, int]]:
    """(query id, indexed id) for each query whose prompt is the same as, or a near-duplicate of,
    an indexed one. overlap(train, ..., test, ...) must be empty before training."""
    index = NearDupIndex()
    index.add_many(indexed_sigs, [it.id for it in indexed])
    keys = band_keys(query_sigs)
    return [(it.id, index.tags[hit]) for it, sig, k in zip(queries, query_sigs, keys, strict=False)
            if (hit := index.match(sig, k)) is not None]


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


def prompt_completion_rows(it: Item) -> list[dict[str, Any]]:
    """TRL's conversational prompt/completion format: the loss covers the answer only (what a cycle trains on)."""
    return [{"prompt": it.prompt, "completion": _assistant(it.chosen)}] if it.chosen else []


FORMATS = {"sft": sft_rows, "dpo": dpo_rows, "kto": kto_rows, "prompt-completion": prompt_completion_rows}


def rows_for(items: list[Item], fmt: str) -> list[dict[str, Any]]:
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}; use one of {', '.join(FORMATS)}")
    make = FORMATS[fmt]
    return [row for it in items for row in make(it)]
