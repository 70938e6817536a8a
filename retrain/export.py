"""Write a built dataset split as JSONL in one of TRL's formats, with its manifest.

Every file comes with a manifest (FILE.manifest.json): row counts, the example and feedback ids
it was built from and the file's sha256, so a training run knows exactly what it trained on. The
CLI's `tuneloop data export` and every cycle's training files are written here.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from retrain import dataset
from retrain.examples import Built


def write(built: Built, fmt: str, split: str, out: Path) -> dict[str, Any]:
    if split not in dataset.SPLITS:
        raise ValueError(f"split {split!r}; use one of {', '.join(dataset.SPLITS)}")
    items = built.splits[split]
    rows = dataset.rows_for(items, fmt)
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
