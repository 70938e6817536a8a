"""The Gradio chat: streaming answers from the active version, thumbs, corrections, comments.

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
    return f"Serving adapter **{adapter}** on {base_name}" if adapter else f"Serving the base model **{base_name}** (no adapter yet)"


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

    def respond(text: str, history: list[dict], state: dict, request: gr.Request):
        if not (text or "").strip():
            yield gr.skip(), history, state, gr.skip(), ""
            return
        shown = [*history, {"role": "user", "content": text}]
        yield "", shown, state, gr.skip(), ""
        # The model is sent the stored conversation (with its original answers, whatever the user edited
        # since), so what is stored is what the model saw.
        sent = state.get("sent", [])
        messages = [*sent, {"role": "user", "content": text}]
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
        new = gr.Button("New conversation", elem_id="new-chat", size="sm")

        box.submit(respond, [box, chatbot, state], [box, chatbot, state, serving, status])
        chatbot.like(on_like, [state], [status])
        chatbot.edit(on_edit, [chatbot, state], [chatbot, status])
        save.click(on_comment, [comment, state], [comment, status])
        who = gr.Markdown(elem_id="who")
        new.click(lambda: ([], dict(NEW_STATE), ""), None, [chatbot, state, status])
        # The chatbot's own trash icon empties the shown chat: the next message starts a new conversation.
        chatbot.clear(lambda: (dict(NEW_STATE), ""), None, [state, status])
        demo.load(current_label, None, serving)
        demo.load(whoami, None, who)
    return demo
