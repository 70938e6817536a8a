"""The loop learns from real labelled data: a smaller `make bench B=learning`, on the real model and vLLM.

Part of speech of unambiguous WordNet words (bench/pos_data.py; Debian's wordnet-base): one instruction with
one word that varies. The import keeps every row and splits it 80/10/10; one cycle promotes an adapter whose
free-form chat answers on held-out words are right more often; the same words with shuffled labels give a
candidate the gate keeps out, because classification is judged by accuracy, not by the label's likelihood.
"""

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import services_for
from sqlmodel import select

from data_store.db import make_engine, migrate, session
from data_store.models import Adapter
from retrain import importer, runs
from serve import adapters

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import pos_data  # noqa: E402

pytestmark = pytest.mark.integration

PER_LABEL_TRAIN, PER_LABEL_HELDOUT = 40, 10


def store(live, tmp_path: Path):
    settings = live.settings.model_copy(update={"data_dir": tmp_path / "data", "database_url": "", "gate_min_test_examples": 10})
    migrate(settings.db_url)
    return services_for(settings, make_engine(settings.db_url), live.vllm, live.base_model)


def heldout_accuracy(svc, rows: list[dict]) -> float:
    """Free-form answers through the chat service (vLLM, the active version), as a user would get them."""
    def right(row):
        turn = svc.chat.complete([{"role": "user", "content": row["text"]}], author="evaluator", params={"temperature": 0, "max_tokens": 8})
        return turn.content.strip().strip(".").casefold() == row["label"]
    with ThreadPoolExecutor(8) as pool:
        return sum(pool.map(right, rows)) / len(rows)


def cycle_on(svc, live, rows: list[dict], tmp_path: Path, slot: str):
    pos_data.write_jsonl(rows, tmp_path / f"{slot}.jsonl")
    report = importer.import_file(svc.engine, svc.settings, tmp_path / f"{slot}.jsonl")
    run = svc.run_cycle(runs.claim(svc.engine, slot), force=True)
    assert run.status == "succeeded", f"{run.reason}\n{run.log}"
    return report, run


def test_templated_labels_are_learned_and_shuffled_labels_are_kept_out(live, tmp_path):
    train, heldout = pos_data.build(PER_LABEL_TRAIN, PER_LABEL_HELDOUT)
    svc = store(live, tmp_path / "real")
    before = heldout_accuracy(svc, heldout)
    report, run = cycle_on(svc, live, train, tmp_path, "learn")
    n = len(train)
    assert report.added == n and report.near_duplicates["grouped"] == 0  # the template did not collapse the words
    assert all(abs(report.splits[sp] / n - r) <= 0.03 for sp, r in zip(("train", "val", "test"), svc.settings.split_ratios, strict=False))
    assert run.dataset["examples"] == report.splits and run.dataset["near_duplicates_dropped"] == 0
    d = run.decision
    assert d["promote"], d["summary"]
    primary = next(r for r in d["reasons"] if r["name"] == "primary")
    assert primary["values"]["metric"] == "accuracy"  # classification data is judged on its labels
    assert adapters.active(svc.engine) == run.adapter
    after = heldout_accuracy(svc, heldout)
    svc.vllm.unload_adapter(run.adapter)  # this store's v0001; the next store (and the session's) name theirs alike
    assert after > before + 0.2, (before, after)  # free-form chat now answers held-out words with their label

    shuffled, _ = pos_data.build(PER_LABEL_TRAIN, PER_LABEL_HELDOUT, shuffle_labels=True)
    noise = store(live, tmp_path / "shuffled")
    _, run = cycle_on(noise, live, shuffled, tmp_path, "shuffled")
    d = run.decision
    checks = {r["name"]: r for r in d["reasons"]}
    # No better on the labels it was shown: not better than the base, or (when the base is below
    # chance) not better than always answering the most common label.
    assert not d["promote"] and not (checks["primary"]["passed"] and checks.get("above_majority", {"passed": True})["passed"]), d["summary"]
    assert adapters.active(noise.engine) is None
    with session(noise.engine) as s:
        assert s.exec(select(Adapter).where(Adapter.name == run.adapter)).one().status == "rejected"
    svc.engine.dispose()
    noise.engine.dispose()
