"""Parse, validate and clean imported JSONL lines: pure functions over bytes and plain data.

Accepted shapes, one JSON object per line:
  {"messages": [{"role": "user", "content": ...}, ..., {"role": "assistant", "content": ...}]}
  {"prompt": "...", "completion": "..."}
  {"input": "...", "output": "..."}
  {"text": "...", "label": "..."}          (classification)
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from data_store.text import unstorable

MAX_LINE_BYTES = 1 << 20  # one example above 1 MB is a mistake, not data
ROLES = {"system", "user", "assistant"}


@dataclass
class Record:
    prompt: list[dict[str, str]]  # the messages before the answer
    chosen: str | None  # the good answer (for classification: the label)
    kind: str = "chat"  # chat | classification
    label: str | None = None
    rejected: str | None = None
    rating: int = 0
    author: str = "import"
    source_ref: str = ""


@dataclass
class LineError:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclass
class Parsed:
    records: list[Record] = field(default_factory=list)
    errors: list[LineError] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)  # label -> first line it appears on


def parse_lines(lines: Iterable[bytes], source: str, known_labels: set[str] | None = None) -> Parsed:
    """Every line is checked; errors name the line and the problem. Blank lines are skipped."""
    out = Parsed()
    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            rec = parse_line(raw)
        except ValueError as e:
            out.errors.append(LineError(n, str(e)))
            continue
        rec.source_ref = f"{source}:{n}"
        if rec.label is not None:
            if known_labels is not None and rec.label not in known_labels:
                out.errors.append(LineError(n, f"unknown label {rec.label!r}; known labels: {', '.join(sorted(known_labels))} "
                                               "(pass --labels to extend the set)"))
                continue
            out.labels.setdefault(rec.label, n)
        out.records.append(rec)
    return out


def parse_line(raw: bytes) -> Record:
    if len(raw) > MAX_LINE_BYTES:
        raise ValueError(f"{len(raw)} bytes, above the {MAX_LINE_BYTES // (1 << 20)} MB limit for one example; split or shorten it")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at position {e.start}); re-save the file as UTF-8") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        return _messages(obj["messages"])
    for a, b in (("prompt", "completion"), ("input", "output")):
        if a in obj or b in obj:
            return Record(prompt=[{"role": "user", "content": _text(obj, a)}], chosen=_text(obj, b))
    if "text" in obj or "label" in obj:
        label = _text(obj, "label")
        return Record(prompt=[{"role": "user", "content": _text(obj, "text")}], chosen=label, kind="classification", label=label)
    keys = ", ".join(sorted(obj)) or "none"
    raise ValueError(f"unknown shape (keys: {keys}); expected messages, prompt/completion, input/output or text/label")


def _text(obj: dict[str, Any], key: str) -> str:
    if key not in obj:
        raise ValueError(f"missing field {key!r}")
    value = obj[key]
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} must be a string, got {type(value).__name__}")
    if problem := unstorable(value):
        raise ValueError(f"field {key!r} {problem}")
    return value


def _messages(messages: Any) -> Record:
    if not isinstance(messages, list) or not messages:
        raise ValueError("field 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be an object with role and content")
        if m.get("role") not in ROLES:
            raise ValueError(f"messages[{i}].role is {m.get('role')!r}; use system, user or assistant")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}].content must be a string")
        if problem := unstorable(m["content"]):
            raise ValueError(f"messages[{i}].content {problem}")
    if messages[-1]["role"] != "assistant":
        raise ValueError("the last message must be the assistant's answer to learn")
    if not any(m["role"] == "user" for m in messages[:-1]):
        raise ValueError("there is no user message before the answer")
    prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
    return Record(prompt=prompt, chosen=messages[-1]["content"])


# ---- cleaning ----

_TRAILING = re.compile(r"[ \t]+\n")
_BLANKS = re.compile(r"\n{3,}")


def normalize_ws(text: str) -> str:
    """Unify line ends, drop trailing spaces and runs of blank lines; inner spacing (code) is kept."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _BLANKS.sub("\n\n", _TRAILING.sub("\n", text)).strip()


def clean(records: list[Record], max_chars: int) -> tuple[list[Record], Counter]:
    """Normalize whitespace (in place: the records are freshly parsed); drop empty and over-long
    examples, counting each reason."""
    kept: list[Record] = []
    dropped: Counter = Counter()
    for r in records:
        r.prompt = [{"role": m["role"], "content": normalize_ws(m["content"])} for m in r.prompt]
        r.chosen = None if r.chosen is None else normalize_ws(r.chosen)
        r.rejected = None if r.rejected is None else normalize_ws(r.rejected)
        texts = [m["content"] for m in r.prompt] + [t for t in (r.chosen, r.rejected) if t is not None]
        if not r.prompt[-1]["content"] or (r.chosen is not None and not r.chosen) or (r.chosen is None and not r.rejected):
            dropped["empty"] += 1
        elif sum(map(len, texts)) > max_chars:
            dropped["too long"] += 1
        else:
            kept.append(r)
    return kept, dropped


def class_balance(records: Iterable[Record]) -> dict[str, Any]:
    counts = Counter(r.label for r in records if r.kind == "classification")
    total = sum(counts.values())
    if not total:
        return {}
    return {"total": total, "counts": dict(counts.most_common()),
            "share": {k: round(v / total, 4) for k, v in counts.most_common()},
            "imbalance": round(max(counts.values()) / min(counts.values()), 2)}
