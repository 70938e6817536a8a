"""The review queue over a real store: approval makes examples, caps and auto-approval hold."""

import pytest
from fastapi.testclient import TestClient
from helpers import add_turn, corrected
from sqlmodel import func, select

from data_store.db import session
from data_store.models import Example, Feedback
from feedback import curation
from feedback import record as feedback
from feedback.fields import FeedbackError
from retrain import examples, export
from serve.chat import ChatService
from serve.client import VLLMClient
from serve.services import Services
from serve.web import build_app


def stored_examples(engine):
    with session(engine) as s:
        return s.exec(select(Example).order_by(Example.id)).all()


def test_feedback_waits_in_queue_until_approved(engine, settings):
    fb = corrected(engine, settings)
    assert fb.status == "pending" and stored_examples(engine) == []
    assert curation.counts(engine) == {"pending": 1, "approved": 0, "rejected": 0}
    [item] = curation.queue(engine, curation.Filters())
    assert item.context == [{"role": "user", "content": "What is the capital of France?"}]
    assert (item.answer, item.correction) == ("Lyon is the capital.", "Paris is the capital of France.")
    ex = curation.approve(engine, settings, fb.id)
    assert (ex.chosen, ex.rejected, ex.prompt[-1]["content"]) == ("Paris is the capital of France.", "Lyon is the capital.",
                                                                   "What is the capital of France?")
    assert curation.counts(engine)["approved"] == 1


def test_curator_edits_correction_before_approving(engine, settings):
    fb = corrected(engine, settings)
    ex = curation.approve(engine, settings, fb.id, correction="Paris.")
    assert ex.chosen == "Paris."
    with session(engine) as s:
        assert s.get(Feedback, fb.id).correction == "Paris."


def test_reject_and_change_withdraw_the_example(engine, settings):
    fb = corrected(engine, settings)
    curation.approve(engine, settings, fb.id)
    feedback.record(engine, settings, fb.message_id, correction="Paris!", author="alice")  # the user changed it
    assert stored_examples(engine) == [] and feedback.get(engine, fb.message_id).status == "pending"
    curation.approve(engine, settings, fb.id)
    curation.reject(engine, fb.id)
    assert stored_examples(engine) == [] and curation.counts(engine)["rejected"] == 1


def test_comment_only_feedback_cannot_be_approved(engine, settings):
    mid = add_turn(engine)
    fb = feedback.record(engine, settings, mid, comment="hmm", author="alice")
    with pytest.raises(FeedbackError, match="nothing to learn"):
        curation.approve(engine, settings, fb.id)


def test_filters(engine, settings):
    a = corrected(engine, settings, author="alice")
    b = feedback.record(engine, settings, add_turn(engine, author="bob"), rating="up", author="bob")
    assert [i.feedback_id for i in curation.queue(engine, curation.Filters(author="bob"))] == [b.id]
    assert [i.feedback_id for i in curation.queue(engine, curation.Filters(rating="down"))] == [a.id]
    assert len(curation.queue(engine, curation.Filters(adapter="base"))) == 2
    assert curation.queue(engine, curation.Filters(adapter="v0009")) == []
    with pytest.raises(FeedbackError):
        curation.queue(engine, curation.Filters(status="bogus"))


def test_bulk_approve_on_filter_respects_author_cap(engine, settings):
    settings.curation_author_cap = 3
    for _ in range(5):
        corrected(engine, settings, author="mallory")
    corrected(engine, settings, author="alice")
    report = curation.bulk(engine, settings, "approve", curation.Filters(author="mallory"))
    assert report.done == 3 and len(report.skipped) == 2 and "cap" in report.skipped[0]
    assert curation.counts(engine) == {"pending": 3, "approved": 3, "rejected": 0}
    assert curation.bulk(engine, settings, "reject", curation.Filters(status="pending")).done == 3


def test_auto_approval_policy(engine, settings):
    settings.auto_approve_thumbs_up = True
    settings.trusted_authors = "carol"
    up = feedback.record(engine, settings, add_turn(engine, author="dave"), rating="up", author="dave")
    down = feedback.record(engine, settings, add_turn(engine, author="dave"), rating="down", author="dave")
    trusted = corrected(engine, settings, author="carol")
    assert (up.status, down.status, trusted.status) == ("approved", "pending", "approved")
    assert len(stored_examples(engine)) == 2
    # An anonymous session is never auto-approved, even if an operator lists it as trusted.
    settings.trusted_authors = "carol,anonymous:s1"
    anon = [feedback.record(engine, settings, add_turn(engine, author="anonymous:s1"), author="anonymous:s1", **kw)
            for kw in ({"rating": "up"}, {"rating": "down", "correction": "Paris."})]
    assert [a.status for a in anon] == ["pending", "pending"] and len(stored_examples(engine)) == 2


def test_approved_feedback_exports_sft_and_dpo(engine, settings, tmp_path):
    fb = corrected(engine, settings)
    curation.approve(engine, settings, fb.id)
    built = examples.build(engine)
    split = next(k for k, v in built.splits.items() if v)
    sft = export.write(built, "sft", split, tmp_path / "sft.jsonl")
    dpo = export.write(built, "dpo", split, tmp_path / "dpo.jsonl")
    assert sft["rows"] == dpo["rows"] == 1 and sft["feedback_ids"] == [fb.id]
    assert "Paris is the capital of France." in (tmp_path / "dpo.jsonl").read_text()


def test_curation_api_needs_login_when_configured(settings, engine):
    settings.curators = "cur:pw"
    vllm = VLLMClient(settings.served_vllm_url)
    services = Services(settings, engine, vllm, ChatService(settings, engine, vllm, "tiny"), "tiny")
    fb = corrected(engine, settings)
    with TestClient(build_app(services)) as c:
        assert c.get("/api/curation/queue").status_code == 401
        assert c.post(f"/api/curation/{fb.id}/approve", json={}).status_code == 401
        assert c.get("/api/curation/queue", auth=("cur", "wrong")).status_code == 401
        r = c.get("/api/curation/queue", auth=("cur", "pw"))
        assert r.status_code == 200 and r.json()["counts"]["pending"] == 1
        r = c.post(f"/api/curation/{fb.id}/approve", json={"correction": "Paris."}, auth=("cur", "pw"))
        assert r.status_code == 200
        assert c.post("/api/curation/999/reject", auth=("cur", "pw")).status_code == 404
        # The curation page asks for a login; the chat page does not.
        assert c.get("/curate/config").status_code in (401, 403) or "login" in c.get("/curate/").text.lower()
        assert c.get("/").status_code == 200
    with session(engine) as s:
        assert s.exec(select(func.count()).select_from(Example)).one() == 1


def test_a_correction_that_is_a_declared_label_makes_a_classification_example(engine, settings):
    examples.declare_labels(engine, ["noun", "verb"])
    mid = add_turn(engine, "The word is used as a noun in most sentences.")
    fb = feedback.record(engine, settings, mid, rating="down", correction=" Noun. ", author="alice")
    ex = curation.approve(engine, settings, fb.id)
    assert (ex.kind, ex.label, ex.chosen) == ("classification", "noun", "noun")  # the declared spelling
    other = feedback.record(engine, settings, add_turn(engine, "Lyon.", author="bob"), rating="down", correction="Paris, probably.",
                            author="bob")
    assert curation.approve(engine, settings, other.id).kind == "chat"
    with pytest.raises(ValueError, match="label"):
        examples.declare_labels(engine, ["x" * 201])


def test_opening_one_item_reads_that_item(engine, settings):
    fb = corrected(engine, settings)
    it = curation.item(engine, fb.id)
    assert (it.feedback_id, it.answer, it.context[-1]["content"]) == (fb.id, "Lyon is the capital.", "What is the capital of France?")
    with pytest.raises(FeedbackError, match="does not exist"):
        curation.item(engine, 999)


def test_new_feedback_keeps_every_imported_example(engine, settings, tmp_path):
    """A first thumb, a correction, a rejection and a re-approval touch only their own example: imported
    examples (no feedback_id) are never matched by `feedback_id == None`."""
    import json

    from retrain import importer

    f = tmp_path / "seed.jsonl"
    f.write_text("\n".join(json.dumps({"prompt": f"Spell the number {i}.", "completion": f"number {i}"}) for i in range(12)))
    importer.import_file(engine, settings, f)
    imported = len(stored_examples(engine))
    fb = feedback.record(engine, settings, add_turn(engine), rating="down", correction="Paris.", author="alice")
    curation.approve(engine, settings, fb.id)
    curation.approve(engine, settings, fb.id, correction="Paris, France.")
    assert len(stored_examples(engine)) == imported + 1
    curation.reject(engine, fb.id)
    feedback.record(engine, settings, add_turn(engine, author="bob"), rating="up", author="bob")
    assert [ex.source for ex in stored_examples(engine)] == ["import"] * imported
