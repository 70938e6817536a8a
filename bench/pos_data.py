"""A part-of-speech classification set from WordNet 3.0, a labelled dataset nobody on the project wrote.

Run as: .venv/bin/python bench/pos_data.py   (label counts and five sample rows)
Words: one lowercase alphabetic lemma of 3-12 letters, in exactly one of WordNet's four index files
(unambiguous), tagged at least once in SemCor (tagsense_cnt >= 1, so reasonably common).
Needs Debian's wordnet-base (`make wordnet`).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

WORDNET = Path("/usr/share/wordnet")
FILES = {"noun": "index.noun", "verb": "index.verb", "adjective": "index.adj", "adverb": "index.adv"}
PROMPT = "What part of speech is the English word '{word}'? Answer with one word: noun, verb, adjective or adverb."
WORD = re.compile(r"[a-z]{3,12}")


def read_index(path: Path) -> dict[str, int]:
    """lemma -> tagsense_cnt. A line: lemma pos synset_cnt p_cnt [ptr_symbol...] sense_cnt tagsense_cnt offset..."""
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line or line.startswith(" "):  # the licence header lines start with two spaces
            continue
        f = line.split()
        p_cnt = int(f[3])
        out[f[0]] = int(f[5 + p_cnt])
    return out


def words_by_label(root: Path = WORDNET) -> dict[str, list[str]]:
    missing = [str(root / name) for name in FILES.values() if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(f"WordNet index files missing ({', '.join(missing)}); "
                                "install them with `apt-get install wordnet-base` (or `make wordnet`)")
    index = {label: read_index(root / name) for label, name in FILES.items()}
    seen: dict[str, int] = {}
    for words in index.values():
        for w in words:
            seen[w] = seen.get(w, 0) + 1
    return {label: sorted(w for w, tagged in words.items() if seen[w] == 1 and tagged >= 1 and WORD.fullmatch(w))
            for label, words in index.items()}


def build(per_label_train: int, per_label_heldout: int, seed: int = 0, shuffle_labels: bool = False,
          root: Path = WORDNET) -> tuple[list[dict], list[dict]]:
    """Train and held-out rows {"text", "label"}, balanced per label; no held-out word is in train."""
    rng = random.Random(seed)
    train, heldout = [], []
    for label, words in words_by_label(root).items():
        need = per_label_train + per_label_heldout
        if len(words) < need:
            raise ValueError(f"only {len(words)} unambiguous {label}s; asked for {need}")
        picked = rng.sample(words, need)
        train += [{"text": PROMPT.format(word=w), "label": label} for w in picked[:per_label_train]]
        heldout += [{"text": PROMPT.format(word=w), "label": label} for w in picked[per_label_train:]]
    rng.shuffle(train)
    rng.shuffle(heldout)
    if shuffle_labels:  # the words stay, their labels are permuted among the train rows; held-out stays true
        labels = [r["label"] for r in train]
        rng.shuffle(labels)
        train = [{"text": r["text"], "label": lab} for r, lab in zip(train, labels, strict=False)]
    return train, heldout


def write_jsonl(rows: list[dict], path: Path) -> None:
    Path(path).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


if __name__ == "__main__":
    print({label: len(words) for label, words in words_by_label().items()})
    train, heldout = build(105, 45)
    print(f"train {len(train)}, held-out {len(heldout)}")
    for row in train[:5]:
        print(json.dumps(row))
