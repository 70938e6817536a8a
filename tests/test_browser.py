"""The Gradio chat in real headless Chromium (Debian's package), against the real app and vLLM."""


import pytest
from helpers import own_store, serve_app, services_for, wait_until
from sqlmodel import select

from data_store.db import session
from data_store.models import Conversation, Feedback, Message

pytestmark = [pytest.mark.browser, pytest.mark.integration]

@pytest.fixture
def page(browser, live_url):
    ctx = browser.new_context()
    page = ctx.new_page()
    page.goto(live_url)
    yield page
    ctx.close()


def send(page, text: str) -> str:
    before = page.locator("#chat button[aria-label=Edit]").count()
    page.locator("#msg textarea").fill(text)
    page.locator("#msg textarea").press("Enter")
    # Two more Edit buttons (question and answer); the answer's is enabled once streaming ends.
    page.wait_for_function(
        "n => { const b = [...document.querySelectorAll('#chat button[aria-label=Edit]')];"
        " return b.length >= n + 2 && !b[b.length - 1].disabled; }", arg=before, timeout=240_000)  # a whole answer on a loaded 2-core box
    return page.locator("#chat [data-testid='bot']").last.inner_text()


def dislike_and_correct(page, correction: str) -> None:
    """Thumbs down on the last answer, then edit it into the correction."""
    page.locator("#chat button[aria-label='Dislike']").last.click()
    wait_until(lambda: "rated 👎" in page.locator("#status").inner_text())
    page.locator("#chat button[aria-label='Edit']").last.click()
    page.locator("#chat textarea.edit-textarea").fill(correction)
    page.locator("#chat button[aria-label='Submit']").click()
    wait_until(lambda: "Correction saved" in page.locator("#status").inner_text())


def test_chat_thumbs_down_and_correct(page, live):
    wait_until(lambda: "Serving the base model" in page.locator("#serving").inner_text())
    answer = send(page, "What is the capital of France?")
    assert answer.strip()

    def stored():
        with session(live.engine) as s:
            return s.exec(select(Message).where(Message.role == "assistant", Message.content == answer)).first()

    msg = wait_until(stored)
    with session(live.engine) as s:
        assert s.get(Conversation, msg.conversation_id).source == "ui"
        convo = s.exec(select(Message).where(Message.conversation_id == msg.conversation_id).order_by(Message.position)).all()
    assert [(m.role, m.content) for m in convo] == [("user", "What is the capital of France?"), ("assistant", answer)]

    dislike_and_correct(page, "Paris is the capital of France.")

    page.locator("#comment textarea").fill("It rambled.")
    page.locator("#save-comment").click()
    wait_until(lambda: "Comment saved" in page.locator("#status").inner_text())

    with session(live.engine) as s:
        rows = s.exec(select(Feedback).where(Feedback.message_id == msg.id)).all()
        original = s.get(Message, msg.id).content
    assert len(rows) == 1
    fb = rows[0]
    assert (fb.rating, fb.correction, fb.comment, fb.status) == ("down", "Paris is the capital of France.", "It rambled.", "pending")
    assert fb.author.startswith("anonymous:")  # the server-issued session of this browser
    assert original == answer  # the original answer is kept beside the correction


def test_second_turn_continues_the_conversation(page, live):
    send(page, "Hello!")
    first = wait_until(lambda: _last_assistant(live))
    send(page, "Tell me a fact.")
    second = wait_until(lambda: (m := _last_assistant(live)) and m.id != first.id and m)
    assert second.conversation_id == first.conversation_id and second.position == 3


def _last_assistant(live):
    with session(live.engine) as s:
        return s.exec(select(Message).where(Message.role == "assistant").order_by(Message.id.desc())).first()


def test_ui_feedback_to_curator_approval_to_export(page, browser, live, live_url, tmp_path):
    import json
    import re

    from retrain import examples, export

    answer = send(page, "What is the capital of Spain?")
    dislike_and_correct(page, "Madrid is the capital of Spain.")
    with session(live.engine) as s:
        fb = s.exec(select(Feedback).where(Feedback.correction == "Madrid is the capital of Spain.")).one()
    assert fb.status == "pending"

    curator = browser.new_page()
    curator.goto(f"{live_url}/curate/")
    cell = curator.locator("#queue [role=gridcell]").filter(has_text=re.compile(rf"^\s*{fb.id}\s*$"))
    cell.first.wait_for()
    cell.first.click()
    wait_until(lambda: curator.locator("#correction textarea").input_value() == "Madrid is the capital of Spain.")
    assert curator.locator("#answer textarea").input_value() == answer
    curator.locator("#approve").click()
    wait_until(lambda: f"Feedback {fb.id} approved" in curator.locator("#result").inner_text())
    curator.close()

    built = examples.build(live.engine)
    split = next(name for name, items in built.splits.items() if any(it.feedback_id == fb.id for it in items))
    export.write(built, "sft", split, tmp_path / "sft.jsonl")
    export.write(built, "dpo", split, tmp_path / "dpo.jsonl")
    sft = [json.loads(line) for line in (tmp_path / "sft.jsonl").read_text().splitlines()]
    dpo = [json.loads(line) for line in (tmp_path / "dpo.jsonl").read_text().splitlines()]
    assert {"messages": [{"role": "user", "content": "What is the capital of Spain?"},
                         {"role": "assistant", "content": "Madrid is the capital of Spain."}]} in sft
    assert {"prompt": [{"role": "user", "content": "What is the capital of Spain?"}],
            "chosen": [{"role": "assistant", "content": "Madrid is the capital of Spain."}],
            "rejected": [{"role": "assistant", "content": answer}]} in dpo


HOSTILE = ('<script>window.__pwned = 1</script> <img src=x onerror="window.__pwned = 2"> <svg onload="window.__pwned = 3"></svg> '
           '[click me](javascript:window.__pwned=4) <a href="javascript:window.__pwned=5">link</a>')
INERT = """() => window.__pwned === 0 && !document.querySelector('[onerror], [onload], a[href^="javascript:"]')
    && ![...document.scripts].some(s => s.textContent.includes('__pwned'))"""


@pytest.mark.faults
def test_hostile_text_is_stored_verbatim_and_rendered_inert(browser, live, live_url):
    import re

    ctx = browser.new_context()
    ctx.add_init_script("window.__pwned = 0")
    dialogs = []
    page = ctx.new_page()
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(live_url)
    send(page, HOSTILE)
    with session(live.engine) as s:
        user = s.exec(select(Message).where(Message.role == "user").order_by(Message.id.desc())).first()
    assert user.content == HOSTILE  # stored verbatim
    for link in page.locator("#chat a", has_text=re.compile("click me|link")).all():
        link.click(force=True)
    page.locator("#chat button[aria-label='Edit']").last.click()
    page.locator("#chat textarea.edit-textarea").fill(HOSTILE)
    page.locator("#chat button[aria-label='Submit']").click()
    wait_until(lambda: "Correction saved" in page.locator("#status").inner_text())
    assert page.evaluate(INERT), page.locator("#chat").inner_html()[:2000]
    with session(live.engine) as s:
        fb = s.exec(select(Feedback).order_by(Feedback.updated_at.desc())).first()
    assert fb.correction == HOSTILE

    curator = ctx.new_page()
    curator.goto(f"{live_url}/curate/")
    cell = curator.locator("#queue [role=gridcell]").filter(has_text=re.compile(rf"^\s*{fb.id}\s*$"))
    cell.first.wait_for()
    cell.first.click()
    wait_until(lambda: curator.locator("#correction textarea").input_value() == HOSTILE)
    assert curator.evaluate(INERT), curator.locator("#queue").inner_html()[:2000]
    assert page.evaluate(INERT) and dialogs == []
    ctx.close()


def test_a_failed_turn_then_thumbs_down_and_edit_land_on_the_right_answer(page, live):
    """A turn vLLM refuses (longer than the context) leaves the chat and stores nothing; the next answer's
    thumb and edit reach that answer's message, and the stored conversation is what the model was sent."""
    wait_until(lambda: "Serving" in page.locator("#serving").inner_text())
    first = send(page, "Say hello.")
    with session(live.engine) as s:
        before = s.exec(select(Message).where(Message.role == "assistant", Message.content == first)).first()
    too_long = "hello " * 2600  # under the box's 16,000 characters, over the model's 2,048 tokens
    page.locator("#msg textarea").fill(too_long)
    page.locator("#msg textarea").press("Enter")
    wait_until(lambda: "Not sent" in page.locator("#status").inner_text(), timeout=120)
    assert page.locator("#msg textarea").input_value() == too_long  # given back to edit
    assert page.locator("#chat [data-testid='user']").count() == 1  # the failed question left the chat

    answer = send(page, "What is the capital of Italy?")
    dislike_and_correct(page, "Rome is the capital of Italy.")
    third = send(page, "And of Spain?")  # after an edit: the model is sent the stored (original) answer
    page.locator("#chat button[aria-label='Like']").last.click()
    wait_until(lambda: "rated 👍" in page.locator("#status").inner_text())

    with session(live.engine) as s:
        convo = s.exec(select(Message).where(Message.conversation_id == before.conversation_id).order_by(Message.position)).all()
        assert [(m.role, m.content) for m in convo] == [
            ("user", "Say hello."), ("assistant", first), ("user", "What is the capital of Italy?"), ("assistant", answer),
            ("user", "And of Spain?"), ("assistant", third)]
        assert not s.exec(select(Message).where(Message.content == too_long)).first()
        rated = {s.get(Message, f.message_id).content: (f.rating, f.correction)
                 for f in s.exec(select(Feedback).where(Feedback.message_id.in_([m.id for m in convo])))}
    assert rated == {answer: ("down", "Rome is the capital of Italy."), third: ("up", None)}

    # The chatbot's own Clear (trash) icon: the next message starts a new conversation, ids restart with it.
    page.locator("#chat button[aria-label='Clear']").click()
    wait_until(lambda: page.locator("#chat [data-testid='bot']").count() == 0)
    fourth = send(page, "Say goodbye.")
    page.locator("#chat button[aria-label='Dislike']").last.click()
    wait_until(lambda: "rated 👎" in page.locator("#status").inner_text())
    with session(live.engine) as s:
        msg = s.exec(select(Message).where(Message.role == "assistant", Message.content == fourth)
                     .order_by(Message.id.desc())).first()
        assert msg.conversation_id != before.conversation_id and msg.position == 1
        assert s.exec(select(Feedback).where(Feedback.message_id == msg.id)).one().rating == "down"


def test_curator_login_and_api_keys_in_chromium(browser, live):
    """With curators configured, /curate sends the browser to the login form; after it the page and its
    buttons work, an API key issued on the API keys tab works once shown and stops when revoked."""
    import httpx

    prod = services_for(live.settings.model_copy(update={"curators": "ops:pw-9", "users": "alice:pw-a"}),
                        live.engine, live.vllm, live.base_model)
    with serve_app(prod) as url:
        ctx = browser.new_context()
        page = ctx.new_page()
        page.goto(f"{url}/curate")
        page.wait_for_url("**/curate/login**")
        for user, password in (("alice", "pw-a"), ("ops", "wrong")):  # a chat account is no curator
            page.fill("input[name=username]", user)
            page.fill("input[name=password]", password)
            page.click("#login")
            assert "Wrong user or password" in page.content()
        page.fill("input[name=username]", "ops")
        page.fill("input[name=password]", "pw-9")
        page.click("#login")
        page.wait_for_url(f"{url}/curate/")
        page.get_by_role("tab", name="API keys").click()
        page.locator("#key-owner textarea, #key-owner input").first.fill("notebook-user")
        page.locator("#key-issue").click()
        wait_until(lambda: "issued for" in page.locator("#key-note").inner_text())
        key = page.locator("#key-new textarea, #key-new input").first.input_value()
        assert key.startswith("tl_")
        with session(live.engine) as s:
            from data_store.models import ApiKey

            row = s.exec(select(ApiKey).where(ApiKey.owner == "notebook-user")).one()
        assert row.created_by == "ops"
        health = httpx.get(f"{url}/api/curation/keys", headers={"Authorization": f"Bearer {key}"})
        assert health.status_code == 401  # an API key is not a curator credential
        body = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}
        r = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=300)
        assert r.status_code == 200
        with session(live.engine) as s:
            msg = s.get(Message, r.json()["tuneloop"]["message_id"])
            assert s.get(Conversation, msg.conversation_id).author == "notebook-user"
        page.locator("#key-id input").fill(str(row.id))
        page.locator("#key-revoke").click()
        wait_until(lambda: "is revoked" in page.locator("#key-note").inner_text())
        r = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]
        ctx.close()


def test_system_prompt_and_picking_up_a_past_conversation(page, live):
    """A system prompt opens the conversation (stored first); after a new conversation, the first one is
    picked from the user's list, shown again, and the next message continues it."""
    page.locator("#system textarea").fill("You are terse. Answer in one sentence.")
    answer = send(page, "Hello there!")
    first = wait_until(lambda: (m := _last_assistant(live)) and m.content == answer and m)
    with session(live.engine) as s:
        convo = s.exec(select(Message).where(Message.conversation_id == first.conversation_id).order_by(Message.position)).all()
    assert [(m.role, m.content) for m in convo[:2]] == [("system", "You are terse. Answer in one sentence."), ("user", "Hello there!")]

    page.locator("#new-chat").click()
    wait_until(lambda: page.locator("#chat [data-testid='bot']").count() == 0)
    send(page, "Name a colour.")
    second = wait_until(lambda: (m := _last_assistant(live)) and m.id != first.id and m)
    assert second.conversation_id != first.conversation_id

    page.locator("#past input").click()
    page.get_by_role("option", name="Hello there!").first.click()  # labelled by its first question
    wait_until(lambda: f"Opened conversation {first.conversation_id}" in page.locator("#status").inner_text())
    assert page.locator("#chat [data-testid='bot']").count() == 1
    assert page.locator("#chat [data-testid='bot']").last.inner_text().strip() == answer.strip()
    send(page, "Say it again.")
    third = wait_until(lambda: (m := _last_assistant(live)) and m.id not in (first.id, second.id) and m)
    assert third.conversation_id == first.conversation_id and third.position == 4  # system, user, answer, user, answer


def test_a_refused_rollback_is_said_in_the_runs_tab_and_the_table_stays(browser, live, tmp_path):
    """Nothing was ever promoted in a fresh store: Roll back is refused, and the Runs tab says why in its
    message line (a refusal is an answer, not a failure that would blank the table)."""
    svc = own_store(live, tmp_path)
    with serve_app(svc) as url:
        page = browser.new_page()
        page.goto(f"{url}/curate/")
        page.get_by_role("tab", name="Runs").click()
        page.locator("#rollback").click()
        wait_until(lambda: "Refused: nothing to roll back" in page.locator("#runs-message").inner_text(), timeout=60)
        assert "no version was ever promoted" in page.locator("#runs-message").inner_text()
        assert "Serving: base model" in page.locator("#runs-serving").inner_text() and page.locator("#runs").is_visible()
        page.close()
