"""Import seed data from JSONL into the curated store: validate all, then write all at once.

A file with any bad line imports nothing unless skip_invalid; re-importing a line adds nothing.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from data_store.db import session
from data_store.errors import Refused
from data_store.models import now
from retrain import dataset, examples, parse
from retrain.examples import Splits
from settings import Settings


class ImportFailed(Refused):
    """400: the file cannot be imported; `errors` names its bad lines."""

    def __init__(self, message: str, errors: list[parse.LineError]):
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
    # New examples whose prompt is a near-duplicate of another (they share its split; a dataset build
    # keeps one of each group), with the rule and a few of the pairs, so a user sees why a file shrank.
    near_duplicates: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def read_lines(path: Path) -> list[bytes]:
    if not path.is_file():
        raise ImportFailed(f"{path} is not a file", [])
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    if not any(line.strip() for line in lines):
        raise ImportFailed(f"{path} is empty; nothing to import", [])
    return lines


def import_file(engine: Engine, settings: Settings, path: Path, skip_invalid: bool = False,
                labels: list[str] | None = None, probes: bool = False) -> ImportReport:
    """Import seed examples, or with `probes` regression probes: checked by every cycle's gate, never trained on."""
    path = Path(path)
    lines = read_lines(path)
    allowed = examples.known_labels(engine)
    if labels:
        allowed = (allowed or set()) | set(labels)
    parsed = parse.parse_lines(lines, path.name, allowed)
    report = ImportReport(lines=sum(1 for line in lines if line.strip()), invalid=[str(e) for e in parsed.errors])
    if parsed.errors and not skip_invalid:
        shown = "\n  ".join(report.invalid[:20]) + (f"\n  ... and {len(parsed.errors) - 20} more" if len(parsed.errors) > 20 else "")
        raise ImportFailed(f"{path.name}: {len(parsed.errors)} bad line(s); nothing was imported "
                           f"(fix them, or pass --skip-invalid to import the good lines):\n  {shown}", parsed.errors)
    kept, dropped = parse.clean(parsed.records, settings.max_input_chars)
    report.dropped = dict(dropped)
    report.class_balance = parse.class_balance(kept)
    rows, keys = [], {}
    for r in kept:
        h = dataset.content_hash(r.prompt, r.chosen, r.rejected, r.label, r.kind)
        rows.append((h, r))
    with session(engine) as s:
        present = examples.existing_hashes(s, [h for h, _ in rows])
    unique: dict[str, parse.Record] = {}
    for h, r in rows:
        if h in present:
            report.already_present += 1
        elif h in unique:
            report.duplicates_in_file += 1
        else:
            unique[h] = r
    for h, r in unique.items():
        keys[h] = dataset.prompt_key(r.prompt)
    splits = examples.assign(engine, settings.split_ratios, {keys[h]: r.prompt for h, r in unique.items()},
                    {keys[h]: r.chosen or r.rejected for h, r in unique.items()})
    stamp = now()
    new_labels = {lab: ln for lab, ln in parsed.labels.items() if lab not in (allowed or set())}
    examples.add(engine, splits, [
        dict(source=examples.PROBE if probes else "import", source_ref=r.source_ref[:300], content_hash=h, kind=r.kind,
             prompt=r.prompt, chosen=r.chosen, rejected=r.rejected, label=r.label, rating=r.rating, author=r.author,
             prompt_key=keys[h], created_at=stamp, feedback_id=None)
        for h, r in unique.items()], {lab: f"{path.name}:{ln}" for lab, ln in new_labels.items()})
    report.added = len(unique)
    for h in unique:
        report.splits[splits.of[keys[h]]] = report.splits.get(splits.of[keys[h]], 0) + 1
    report.near_duplicates = near_duplicate_report(unique, keys, splits)
    collapsed = report.near_duplicates["grouped"] + report.duplicates_in_file
    if report.lines and collapsed > report.lines / 4:
        report.warnings.append(
            f"{collapsed} of {report.lines} lines ({collapsed / report.lines:.0%}) collapse into other examples "
            f"({report.duplicates_in_file} exact copies, {report.near_duplicates['grouped']} near-duplicates); "
            "training keeps one example of each group. Check near_duplicates.pairs: if they are different examples, the file "
            "may repeat too little of a template for it to be recognized.")
    return report


def near_duplicate_report(unique: dict[str, parse.Record], keys: dict[str, str], splits: Splits) -> dict[str, Any]:
    """How many new examples a dataset build will fold into another, and why."""
    by_key = Counter(keys[h] for h in unique)
    new = {row["key"] for row in splits.new_rows}
    # One prompt with several answers, or a prompt already stored: a build keeps one example of it.
    same_prompt = sum(n - 1 if k in new else n for k, n in by_key.items())
    near = sum(1 for k in splits.twins if k in by_key)  # the key's other examples are counted in same_prompt
    ref = {keys[h]: r.source_ref for h, r in unique.items()}
    return {"grouped": same_prompt + near, "same_prompt": same_prompt, "near_duplicate": near,
            "rule": (f"content word-bigram Jaccard >= {dataset.NEAR_DUP_THRESHOLD}, leaving out the {splits.template} "
                     f"template bigram(s) that >= {dataset.TEMPLATE_SHARE:.1%} of prompts share"),
            "template_bigrams": splits.template,
            "pairs": [f"{ref[k]} ~ {ref.get(twin, 'a stored prompt')}" for k, twin in list(splits.twins.items())[:10]]}


