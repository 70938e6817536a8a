"""The curation page (mounted at /curate, behind the curator login when one is configured).

Curators filter the queue, read each item in its conversation, edit the correction, and approve
or reject one item or everything the filter shows. User text is shown in plain text boxes and
table cells, never rendered as HTML.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import gradio as gr

from data_store.errors import Refused
from feedback import canary_ui, curation, runs_ui
from serve import identity
from serve.services import Services

COLUMNS = ["id", "status", "rating", "author", "adapter", "question", "answer", "correction", "comment", "updated"]
DONE = {"approve": "approved", "reject": "rejected"}  # what a curator action says once done


def _date(text: str, field: str) -> datetime | None:
    if not (text or "").strip():
        return None
    try:
        return datetime.fromisoformat(text.strip()).replace(tzinfo=UTC)
    except ValueError:
        raise gr.Error(f"{field} {text!r} is not a date; use YYYY-MM-DD") from None


def _clip(text: str | None, n: int = 120) -> str:
    text = text or ""
    return text if len(text) <= n else text[: n - 1] + "…"


def _question(context: list[dict[str, str]]) -> str:
    users = [m["content"] for m in context if m["role"] == "user"]
    return users[-1] if users else ""


def build(services: Services) -> gr.Blocks:
    engine, settings = services.engine, services.settings

    def filters(status, rating, adapter, author, since, until) -> curation.Filters:
        return curation.Filters(None if status == "all" else status, None if rating == "any" else rating,
                                (adapter or "").strip() or None, (author or "").strip() or None,
                                _date(since, "since"), _date(until, "until"))

    def load(status, rating, adapter, author, since, until):
        items = curation.queue(engine, filters(status, rating, adapter, author, since, until))
        c = curation.counts(engine)
        rows = [[i.feedback_id, i.status, i.rating or "", i.author, i.adapter or "base", _clip(_question(i.context)),
                 _clip(i.answer), _clip(i.correction), _clip(i.comment), i.updated_at.strftime("%Y-%m-%d %H:%M")] for i in items]
        label = f"Pending: **{c['pending']}** · Approved: **{c['approved']}** · Rejected: **{c['rejected']}** · showing {len(rows)}"
        return gr.update(value=rows or [[""] * len(COLUMNS)]), label

    def pick(rows: Any, evt: gr.SelectData):
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        try:
            return int(rows.iloc[row, 0])
        except (ValueError, IndexError, AttributeError):
            return None

    def show(fid: float | None):
        if not fid:
            return "", "", "", ""
        try:
            i = curation.item(engine, int(fid))
        except Refused as e:
            raise gr.Error(str(e)) from None
        convo = "\n\n".join(f"[{m['role']}] {m['content']}" for m in i.context)
        return convo, i.answer, i.correction or "", f"{i.rating or 'no rating'} · {i.author} · {i.status} · comment: {i.comment or '-'}"

    def act(action: str, fid: float | None, correction: str, *flt):
        if not fid:
            raise gr.Error("pick a feedback item first (click its row, or type its id)")
        try:
            if action == "approve":
                curation.approve(engine, settings, int(fid), correction if correction.strip() else None)
            else:
                curation.reject(engine, int(fid))
        except Refused as e:
            raise gr.Error(str(e)) from None
        table, label = load(*flt)
        return table, label, f"Feedback {int(fid)} {DONE[action]}."

    def act_all(action: str, *flt):
        report = curation.bulk(engine, settings, action, filters(*flt))
        table, label = load(*flt)
        skipped = "".join(f"\n- {s}" for s in report.skipped[:20])
        return table, label, f"{DONE[action].capitalize()} {report.done} item(s).{' Skipped:' + skipped if skipped else ''}"

    with gr.Blocks(title="tuneloop curation") as demo:
        gr.Markdown("## Curation\nApproved feedback becomes training data at the next retrain. Nothing is trained on until approved.")
        with gr.Tab("Review queue"):
            counts = gr.Markdown(elem_id="counts")
            with gr.Row():
                status = gr.Dropdown(["pending", "approved", "rejected", "all"], value="pending", label="Status", elem_id="f-status")
                rating = gr.Dropdown(["any", "up", "down", "none"], value="any", label="Rating", elem_id="f-rating")
                adapter = gr.Textbox(label="Adapter (or 'base')", elem_id="f-adapter")
                author = gr.Textbox(label="Author", elem_id="f-author")
                since = gr.Textbox(label="Since (YYYY-MM-DD)", elem_id="f-since")
                until = gr.Textbox(label="Until (YYYY-MM-DD)", elem_id="f-until")
            flt = [status, rating, adapter, author, since, until]
            with gr.Row():
                refresh = gr.Button("Refresh", elem_id="refresh")
                approve_all = gr.Button("Approve all shown", elem_id="approve-all")
                reject_all = gr.Button("Reject all shown", elem_id="reject-all", variant="stop")
            table = gr.Dataframe(headers=COLUMNS, interactive=False, wrap=True, elem_id="queue")
            with gr.Row():
                fid = gr.Number(label="Feedback id", precision=0, elem_id="fid")
                meta = gr.Textbox(label="Rating · author · status", interactive=False, elem_id="meta")
            context = gr.Textbox(label="Conversation before the answer", interactive=False, lines=4, elem_id="context")
            answer = gr.Textbox(label="Model's answer", interactive=False, lines=3, elem_id="answer")
            correction = gr.Textbox(label="Correction (edit before approving)", lines=3, elem_id="correction",
                                    max_length=settings.max_input_chars)
            with gr.Row():
                approve = gr.Button("Approve", variant="primary", elem_id="approve")
                reject = gr.Button("Reject", elem_id="reject")
            result = gr.Markdown(elem_id="result")

            for trigger in (refresh.click, demo.load, status.change, rating.change):
                trigger(load, flt, [table, counts])
            table.select(pick, [table], [fid])
            fid.change(show, [fid], [context, answer, correction, meta])
            approve.click(lambda *a: act("approve", *a), [fid, correction, *flt], [table, counts, result])
            reject.click(lambda *a: act("reject", *a), [fid, correction, *flt], [table, counts, result])
            approve_all.click(lambda *a: act_all("approve", *a), flt, [table, counts, result])
            reject_all.click(lambda *a: act_all("reject", *a), flt, [table, counts, result])
        with gr.Tab("Runs"):
            runs_ui.build(services, demo)
        with gr.Tab("Canary"):
            canary_ui.build(services, demo)
        with gr.Tab("API keys"):
            keys_tab(services, demo)
    return demo


KEY_COLUMNS = ["id", "owner", "label", "created by", "created", "revoked"]


def keys_tab(services: Services, demo: gr.Blocks) -> None:
    """Issue and revoke the API keys chat clients use; a new key is shown once, only its hash is kept."""
    def rows():
        return [[k.id, k.owner, k.label, k.created_by, f"{k.created_at:%Y-%m-%d %H:%M}",
                 f"{k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else ""] for k in identity.list_keys(services.engine)]

    def issue(owner: str, label: str, request: gr.Request):
        try:
            got = identity.issue_key(services.engine, owner, label, by=getattr(request, "username", None) or "open")
        except Refused as e:
            raise gr.Error(str(e)) from None
        return rows(), got.key, f"Key {got.id} issued for **{got.owner}**. Copy it now: it is not shown again."

    def revoke(key_id):
        if key_id is None:
            raise gr.Error("Enter the id of the key to revoke.")
        try:
            row = services.identities.revoke(int(key_id))
        except Refused as e:
            raise gr.Error(str(e)) from None
        return rows(), f"Key {row.id} of **{row.owner}** is revoked: its next request gets 401."

    gr.Markdown("API clients send `Authorization: Bearer <key>`; their chats and feedback are the key owner's.")
    with gr.Row():
        owner = gr.Textbox(label="Owner (the identity the key acts as)", elem_id="key-owner")
        label = gr.Textbox(label="Label", elem_id="key-label")
        issue_btn = gr.Button("Issue key", variant="primary", elem_id="key-issue")
    new_key = gr.Textbox(label="New key (shown once)", interactive=False, elem_id="key-new")
    table = gr.Dataframe(headers=KEY_COLUMNS, interactive=False, elem_id="keys")
    with gr.Row():
        key_id = gr.Number(label="Key id", precision=0, elem_id="key-id")
        revoke_btn = gr.Button("Revoke", variant="stop", elem_id="key-revoke")
    note = gr.Markdown(elem_id="key-note")
    issue_btn.click(issue, [owner, label], [table, new_key, note])
    revoke_btn.click(revoke, [key_id], [table, note])
    demo.load(rows, None, table)
