"""Import seed data from JSONL into the curated store: validate all, then write all at once.

A file with any bad line imports nothing unless skip_invalid; re-importing a line adds nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
from sqlalchemy import insert, select
from sqlalchemy.engine import Engine

from data_store.db import session
from data_store.models import Example, LabelSet, SplitKey, now
from retrain import dataset, records
from settings import Settings


class ImportFailed(ValueError):
    def __init__(self, message: str, errors: list[records.LineError]):
        super().__init__(message)
        self.errors = errors


@dataclass
class ImportReport:
    lines: int = 0
    added: int = 0
    already_present: int = 0
    duplicates_in_file: int = 0
    invalid: list[str] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    splits: dict[str, int] = field(default_factory=dict)
    class_balance: dict[str, Any] = field(default_factory=dict)


def read_lines(path: Path) -> list[bytes]:
    if not path.is_file():
        raise ImportFailed(f"{path} is not a file", [])
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    if not any(line.strip() for line in lines):
        raise ImportFailed(f"{path} is empty; nothing to import", [])
    return lines


def known_labels(engine: Engine) -> Optional[set[str]]:
    with session(engine) as s:
        labels = set(s.execute(select(LabelSet.label)).scalars().all())
    return labels or None


def import_file(engine: Engine, settings: Settings, path: Path, skip_invalid: bool = False,
                labels: Optional[list[str]] = None, probes: bool = False) -> ImportReport:
    """Import seed examples, or with `probes` regression probes: checked by every cycle's gate, never trained on."""
    path = Path(path)
    lines = read_lines(path)
    allowed = known_labels(engine)
    if labels:
        allowed = (allowed or set()) | set(labels)
    parsed = records.parse_lines(lines, path.name, allowed)
    report = ImportReport(lines=sum(1 for line in lines if line.strip()), invalid=[str(e) for e in parsed.errors])
    if parsed.errors and not skip_invalid:
        shown = "\n  ".join(report.invalid[:20]) + (f"\n  ... and {len(parsed.errors) - 20} more" if len(parsed.errors) > 20 else "")
        raise ImportFailed(f"{path.name}: {len(parsed.errors)} bad line(s); nothing was imported "
                           f"(fix them, or pass --skip-invalid to import the good lines):\n  {shown}", parsed.errors)
    kept, dropped = records.clean(parsed.records, settings.max_input_chars)
    report.dropped = dict(dropped)
    report.class_balance = records.class_balance(kept)
    rows, keys = [], {}
    for r in kept:
        h = dataset.content_hash(r.prompt, r.chosen, r.rejected, r.label, r.kind)
        rows.append((h, r))
    with session(engine) as s:
        present = _existing_hashes(s, [h for h, _ in rows])
    unique: dict[str, records.Record] = {}
    for h, r in rows:
        if h in present:
            report.already_present += 1
        elif h in unique:
            report.duplicates_in_file += 1
        else:
            unique[h] = r
    for h, r in unique.items():
        keys[h] = dataset.prompt_key(r.prompt)
    splits = assign(engine, settings, {keys[h]: r.prompt for h, r in unique.items()})
    stamp = now()
    with session(engine) as s:
        conn = s.connection()  # Core inserts: the ORM's per-row bookkeeping is the slow part at 100k rows
        if splits.new_rows:
            conn.execute(insert(SplitKey.__table__), splits.new_rows)
        if unique:
            conn.execute(insert(Example.__table__), [
                dict(source="probe" if probes else "import", source_ref=r.source_ref[:300], content_hash=h, kind=r.kind, prompt=r.prompt,
                     chosen=r.chosen, rejected=r.rejected, label=r.label, rating=r.rating, author=r.author,
                     prompt_key=keys[h], created_at=stamp, feedback_id=None)
                for h, r in unique.items()])
        new_labels = {lab: ln for lab, ln in parsed.labels.items() if lab not in (allowed or set())}
        if new_labels:
            conn.execute(insert(LabelSet.__table__), [{"label": lab, "source_ref": f"{path.name}:{ln}"} for lab, ln in new_labels.items()])
    report.added = len(unique)
    for h in unique:
        report.splits[splits.of[keys[h]]] = report.splits.get(splits.of[keys[h]], 0) + 1
    return report


def _existing_hashes(s, hashes: list[str]) -> set[str]:
    found: set[str] = set()
    for i in range(0, len(hashes), 500):
        found |= set(s.execute(select(Example.content_hash).where(Example.content_hash.in_(hashes[i:i + 500]))).scalars())
    return found


@dataclass
class Splits:
    of: dict[str, str]  # prompt key -> split, for every key asked about
    new_rows: list[dict[str, Any]]  # SplitKey rows to insert


def assign(engine: Engine, settings: Settings, prompts: dict[str, list[dict[str, str]]]) -> Splits:
    with session(engine) as s:
        return assign_in(s, settings, prompts)


def assign_in(s, settings: Settings, prompts: dict[str, list[dict[str, str]]]) -> Splits:
    """Known keys keep their split; new ones get one (inherited from a near-duplicate, else hashed)."""
    known = {k: (sp, mh) for k, sp, mh in s.execute(select(SplitKey.key, SplitKey.split, SplitKey.minhash)).all()}
    new_keys = [k for k in prompts if k not in known]
    sigs = dataset.signatures([dataset.prompt_text(prompts[k]) for k in new_keys])
    existing = ((k, sp, np.frombuffer(mh, dtype=np.uint32)) for k, (sp, mh) in known.items())
    fresh = dataset.assign_splits(existing, list(zip(new_keys, sigs)), settings.split_ratios)
    stamp = now()
    rows = [{"key": k, "split": fresh[k], "minhash": sig.tobytes(), "created_at": stamp} for k, sig in zip(new_keys, sigs)]
    of = {k: known[k][0] if k in known else fresh[k] for k in prompts}
    return Splits(of, rows)
