"""The canary's decision as a pure function over counts, and its arms and counts in a real store."""

import random

import pytest
from helpers import build_lora

from data_store.db import session
from data_store.models import Conversation, Feedback, Message
from serve import adapters, canary
from serve.canary import Arm, decide
from serve.chat import ChatService
from serve.client import VLLMClient

RULES = dict(alpha=0.05, min_rated=500, max_age_s=72 * 3600)


@pytest.mark.parametrize("canary_arm,control_arm,age_h,action", [
    ((20, 100), (80, 100), 1, "rollback"),  # 80% thumbs-down against 20%
    ((5, 25), (20, 25), 1, "rollback"),  # the same split is clear at 25 each
    ((3, 15), (12, 15), 1, "continue"),  # ...and not yet at 15
    ((0, 5), (5, 5), 1, "continue"),  # all down against all up, but five answers each are below the test's floor
    ((2, 19), (17, 19), 1, "continue"),  # clear, but one below the floor of 20 per arm
    ((75, 100), (80, 100), 1, "continue"),  # 5 points lower: not significant
    ((160, 200), (40, 200), 1, "continue"),  # the canary is far better: never a rollback
    ((400, 500), (395, 500), 1, "complete"),  # both arms rated enough, no drop
    ((200, 1000), (250, 1000), 1, "complete"),  # 20% vs 25% up is below what 1,000 each can show (DESIGN.md: ~1,100)
    ((30, 40), (31, 40), 80, "complete"),  # past the time limit without a drop
    ((0, 0), (0, 0), 1, "continue"),
])
def test_decide_on_tables_with_known_answers(canary_arm, control_arm, age_h, action):
    d = decide(Arm(*canary_arm), Arm(*control_arm), age_h * 3600, **RULES)
    assert d.action == action, d.reason
    assert d.numbers["canary"]["rated"] == canary_arm[1] and d.numbers["threshold"] == 20


def test_the_test_stays_valid_when_looked_at_after_every_rating():
    """Both arms equally good, checked after every one of 300 ratings per arm, 300 times over: it rolls back in
    about alpha of the runs or fewer (a fixed-n test looked at this often would alarm in most). A real drop
    (70% -> 50% thumbs-up) is caught in most runs."""
    def alarms(p_canary: float, p_control: float, runs: int = 300, n: int = 300) -> float:
        rng, hit = random.Random(7), 0
        for _ in range(runs):
            a = b = 0
            for i in range(1, n + 1):
                a += rng.random() < p_canary
                b += rng.random() < p_control
                if decide(Arm(a, i), Arm(b, i), 0, **{**RULES, "min_rated": 10**6}).action == "rollback":
                    hit += 1
                    break
        return hit / runs

    assert alarms(0.7, 0.7) <= 0.06
    assert alarms(0.5, 0.7) >= 0.8


def test_arms_are_sticky_and_counted_from_the_store(settings, engine, tiny_model, tmp_path):
    """New conversations get arms by the share and keep them; counts take the canary's conversations only, each
    once by the latest thumb on its own arm's version's answers, whatever else is in the store."""
    for name in ("live-1", "cand-1"):
        adapters.register(engine, settings, str(tiny_model), build_lora(tiny_model, tmp_path / name), name=name)
    adapters.promote(engine, None, settings, "live-1")
    c = canary.create(engine, "cand-1", "live-1", 0.3, None, "test")
    with pytest.raises(canary.CanaryError, match="already running"):
        canary.create(engine, "cand-1", "live-1", 0.3, None, "test")
    chat = ChatService(settings, engine, VLLMClient(settings.served_vllm_url), "tiny")
    random.seed(3)
    routes = [chat.route(None) for _ in range(400)]
    share = sum(arm == (c.id, "canary") for _, arm in routes) / len(routes)
    assert 0.24 < share < 0.36 and all(v == ("cand-1" if arm[1] == "canary" else "live-1") for v, arm in routes)

    def conversation(arm, ratings, adapter, canary_id=c.id):
        with session(engine) as s:
            conv = Conversation(source="api", author="u", canary_id=canary_id, arm=arm)
            s.add(conv)
            s.flush()
            for i, rating in enumerate(ratings):
                s.add(Message(conversation_id=conv.id, position=2 * i, role="user", content="q"))
                m = Message(conversation_id=conv.id, position=2 * i + 1, role="assistant", content="a", adapter=adapter)
                s.add(m)
                s.flush()
                if rating:
                    s.add(Feedback(message_id=m.id, rating=rating, author="u"))
            return conv.id

    sticky = conversation("canary", ["down", "down", "up", None], "cand-1")  # one conversation: its latest thumb, up
    conversation("canary", ["down"], "cand-1")
    conversation("control", ["up", "up", "down"], "live-1")
    conversation("control", ["down"], "cand-1")  # not the control's version: not counted
    conversation(None, ["down", "down"], "live-1", canary_id=None)  # from before the canary
    assert chat.route(sticky) == ("cand-1", None)
    assert canary.counts(engine, c) == {"canary": Arm(1, 2), "control": Arm(0, 1)}

    ended = canary.end(engine, c.id, "rolled_back", "a test", {"n": 1}, "test")
    assert ended.status == "rolled_back" and ended.decision["reason"] == "a test"
    assert canary.end(engine, c.id, "completed", "again", {}, "test") is None  # ends once
    assert chat.route(sticky) == ("live-1", None) and chat.route(None) == ("live-1", None)


def test_while_a_canary_runs_hand_flips_are_refused_and_a_cycle_is_skipped(settings, engine, tiny_model, tmp_path):
    from retrain import runs
    from serve.services import Services

    adapters.register(engine, settings, str(tiny_model), build_lora(tiny_model, tmp_path / "cand"), name="cand-1")
    c = canary.create(engine, "cand-1", None, 0.2, None, "test")
    vllm = VLLMClient(settings.served_vllm_url)  # a closed port: nothing here may reach vLLM
    svc = Services(settings, engine, vllm, ChatService(settings, engine, vllm, "tiny"), str(tiny_model))
    for act in (lambda: svc.promote("cand-1"), svc.rollback):
        with pytest.raises(canary.CanaryError, match=f"canary {c.id} of cand-1 is running") as e:
            act()
        assert e.value.status == 409
    run = svc.run_cycle(runs.claim(engine, "during-canary"), force=True)
    assert run.status == "skipped" and f"canary {c.id} of cand-1 is running" in run.reason
    assert svc.must_hold() == {"cand-1"}  # reloaded after a vLLM restart along with the active version
    assert canary.end(engine, c.id, "completed", "done", {}, "test").status == "completed"
    canary.reopen(engine, c.id)  # a completion whose promotion failed
    assert canary.running(engine).id == c.id


def test_an_external_vllm_that_went_down_and_came_back_without_the_version_is_given_it_again():
    """ExternalWatch over callables standing in for vLLM's models list (an HTTP boundary): a restart is counted
    once the server is back without what it must hold, whether the watch saw it down or not."""
    from serve.vllm_server import ExternalWatch

    held: set[str] | None = {"v1"}
    loads: list[int] = []

    def models():
        if held is None:
            raise ConnectionError("down")
        return [{"id": m} for m in held]

    watch = ExternalWatch(models, lambda: {"v1"}, lambda: (loads.append(1), held.add("v1")))
    watch.check()
    assert watch.state == "ready" and watch.restarts == 0  # the first load at start is not a restart
    held = None
    watch.check()
    assert watch.state == "unavailable"
    held = set()  # back, empty
    watch.check()
    assert watch.state == "ready" and watch.restarts == 1 and held == {"v1"}
    held.clear()  # lost it without being seen down
    watch.check()
    assert watch.restarts == 2 and held == {"v1"}
