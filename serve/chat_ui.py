"""The Gradio chat: streaming answers from the active version, thumbs, corrections, comments, an
optional system prompt, and the user's past conversations to pick up again.

Each assistant message in the Chatbot maps to its stored message id (a list kept in gr.State,
parallel to the history), so a thumb or an edit updates that message's one feedback record.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from data_store.errors import Refused
from data_store.models import ANONYMOUS
from feedback import record as feedback
from serve.chat import Turn
from serve.client import VLLMError, VLLMUnavailable
from serve.services import Services

# ids: the stored message id of each shown message (None for questions); sent: the stored conversation.
NEW_STATE: dict[str, Any] = {"conversation_id": None, "ids": [], "sent": []}


def text_of(content: Any) -> str:
    """Gradio 6 hands content back as a list of parts; flatten it to text."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text") or ""
    return "".join(text_of(p) for p in content or [])


def serving_label(adapter: str | None, base_name: str) -> str:
    # a version may be a LoRA adapter or a full fine-tune; both were tuned from the base model
    return f"Serving version **{adapter}**, tuned from {base_name}" if adapter else f"Serving the base model **{base_name}**"


def _author(request: gr.Request | None) -> str:
    """The identity the server established for this browser (serve/identity.py, Gradio's auth_dependency)."""
    user = getattr(request, "username", None) if request is not None else None
    if not user:
        raise gr.Error("Your session has no identity; reload the page (or log in).")
    return user


def build(services: Services) -> gr.Blocks:
    chat, settings = services.chat, services.settings

    def current_label() -> str:
        return serving_label(chat.active(), chat.base_name)

    def whoami(request: gr.Request) -> str:
        user = getattr(request, "username", None) or "?"
        if user.startswith(ANONYMOUS):
            return "You are not logged in: your feedback is kept under this browser's session." + (
                " [Log in](/login)" if settings.user_logins else "")
        return f"Logged in as **{user}** · [Log out](/logout)"

    def respond(text: str, history: list[dict], state: dict, system: str, request: gr.Request):
        if not (text or "").strip():
            yield gr.skip(), history, state, gr.skip(), ""
            return
        shown = [*history, {"role": "user", "content": text}]
        yield "", shown, state, gr.skip(), ""
        # The model is sent the stored conversation (with its original answers, whatever the user edited
        # since), so what is stored is what the model saw. A system prompt opens a new conversation only.
        sent = state.get("sent", [])
        opening = [{"role": "system", "content": system}] if not sent and (system or "").strip() else []
        messages = [*opening, *sent, {"role": "user", "content": text}]
        answering = [*shown, {"role": "assistant", "content": ""}]
        try:
            for item in chat.stream(messages, conversation_id=state["conversation_id"], store_from=len(sent),
                                    source="ui", author=_author(request)):
                if isinstance(item, Turn):
                    state = {"conversation_id": item.conversation_id, "ids": [*state["ids"], None, item.message_id],
                             "sent": [*messages, {"role": "assistant", "content": item.content}]}
                    answering[-1]["content"] = item.content
                    yield gr.skip(), answering, state, serving_label(item.adapter, chat.base_name), ""
                else:
                    for choice in item.get("choices") or []:
                        answering[-1]["content"] += (choice.get("delta") or {}).get("content") or ""
                    yield gr.skip(), answering, state, gr.skip(), ""
        except (Refused, VLLMUnavailable, VLLMError) as e:
            why = str(e) if isinstance(e, Refused) else f"The model server could not answer ({e})."
            # Nothing was stored: the turn leaves the chat too (its text goes back in the box), so the
            # shown messages and their stored ids stay in step.
            yield text, history, state, gr.skip(), f"Not sent: {why} Nothing was stored; edit and send again."
            raise gr.Error(f"{why} Nothing was stored; try again.") from None

    def conversations(request: gr.Request, shown: int | None):
        """The user's conversations to pick from (their own only: the server's identity picks them)."""
        return gr.update(choices=[(label, cid) for cid, label in chat.conversations(_author(request))], value=shown)

    def past(request: gr.Request):
        return conversations(request, None)

    def past_after_turn(state: dict, request: gr.Request):
        """Once a turn is stored (a new conversation joins the list), showing the one in the chat."""
        return conversations(request, state["conversation_id"])

    def open_conversation(cid: int | None, request: gr.Request):
        """Show a past conversation (corrected answers as corrected) and continue it with the next message."""
        if cid is None:
            return gr.skip(), gr.skip(), ""
        try:
            rows = chat.messages(int(cid), _author(request))
        except Refused as e:
            return gr.skip(), gr.skip(), f"Not opened: {e}"
        fixed = chat.corrections([m.id for m in rows if m.role == "assistant"])
        shown = [m for m in rows if m.role != "system"]
        history = [{"role": m.role, "content": fixed.get(m.id, m.content)} for m in shown]
        state = {"conversation_id": int(cid), "ids": [m.id if m.role == "assistant" else None for m in shown],
                 "sent": [{"role": m.role, "content": m.content} for m in rows]}
        system = next((m.content for m in rows if m.role == "system"), None)
        return history, state, f"Opened conversation {cid}" + (f" (system prompt: {system[:80]})" if system else "") + "."

    def message_id(state: dict, index: Any) -> int | None:
        i = index[0] if isinstance(index, (list, tuple)) else index
        return state["ids"][i] if isinstance(i, int) and 0 <= i < len(state["ids"]) else None

    def on_like(state: dict, data: gr.LikeData, request: gr.Request):
        mid = message_id(state, data.index)
        if mid is None:
            return "That message was not stored, so it cannot be rated."
        rating = {True: "up", False: "down"}.get(data.liked) if isinstance(data.liked, bool) else None
        try:
            feedback.submit(services.writer, settings, mid, rating=rating, author=_author(request)).result()
        except Refused as e:
            return f"Rating not saved: {e}"
        return f"Thanks: rated {'👍' if rating == 'up' else '👎' if rating == 'down' else 'nothing'} (message {mid})."

    def on_edit(history: list[dict], state: dict, data: gr.EditData, request: gr.Request):
        mid = message_id(state, data.index)
        i = data.index[0] if isinstance(data.index, (list, tuple)) else data.index
        if mid is None:
            # Stored user messages are the record of what was asked: only answers are corrected.
            history[i]["content"] = text_of(data.previous_value)
            return history, "Only the model's answers can be corrected."
        try:
            feedback.submit(services.writer, settings, mid, correction=text_of(data.value), author=_author(request)).result()
        except Refused as e:
            history[i]["content"] = text_of(data.previous_value)
            return history, f"Correction not saved: {e}"
        return history, f"Correction saved for message {mid}; the original answer is kept too."

    def on_comment(text: str, state: dict, request: gr.Request):
        answers = [m for m in state["ids"] if m is not None]
        if not answers:
            return text, "There is no answer to comment on yet."
        try:
            feedback.submit(services.writer, settings, answers[-1], comment=text or None, author=_author(request)).result()
        except Refused as e:
            return text, f"Comment not saved: {e}"
        return "", f"Comment saved for message {answers[-1]}."

    with gr.Blocks(title="tuneloop") as demo:
        gr.Markdown("## tuneloop\nChat, then rate answers with 👍/👎. Edit an answer (pencil icon) to correct it.")
        serving = gr.Markdown(elem_id="serving")
        chatbot = gr.Chatbot(label="Chat", elem_id="chat", feedback_options=("Like", "Dislike"), editable="all",
                             sanitize_html=True, height=460)
        state = gr.State(dict(NEW_STATE))
        box = gr.Textbox(placeholder="Ask something and press Enter", show_label=False, elem_id="msg", max_length=settings.max_input_chars)
        with gr.Row():
            comment = gr.Textbox(placeholder="Optional comment on the last answer", show_label=False, elem_id="comment", scale=4)
            save = gr.Button("Save comment", elem_id="save-comment", scale=1)
        status = gr.Markdown(elem_id="status")
        with gr.Row():
            new = gr.Button("New conversation", elem_id="new-chat", size="sm", scale=1)
            history = gr.Dropdown(label="Your conversations", choices=[], value=None, elem_id="past", scale=4)
        system = gr.Textbox(label="System prompt (optional; it opens the next new conversation)", elem_id="system", lines=2,
                            max_length=settings.max_input_chars)

        box.submit(respond, [box, chatbot, state, system], [box, chatbot, state, serving, status]).then(
            past_after_turn, [state], [history])
        history.input(open_conversation, [history], [chatbot, state, status])
        chatbot.like(on_like, [state], [status])
        chatbot.edit(on_edit, [chatbot, state], [chatbot, status])
        save.click(on_comment, [comment, state], [comment, status])
        who = gr.Markdown(elem_id="who")
        new.click(lambda: ([], dict(NEW_STATE), "", None), None, [chatbot, state, status, history])
        # The chatbot's own trash icon empties the shown chat: the next message starts a new conversation.
        chatbot.clear(lambda: (dict(NEW_STATE), ""), None, [state, status])
        demo.load(current_label, None, serving)
        demo.load(whoami, None, who)
        demo.load(past, None, history)
    return demo
