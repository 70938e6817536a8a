"""A canary with real traffic: conversations through the API to the session's vLLM, thumbs through the API,
and the scheduler's check rolling back a canary whose arm users rate down."""

import itertools
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from helpers import build_lora, own_store, serve_app, wait_until

from serve import adapters, canary

pytestmark = [pytest.mark.integration, pytest.mark.browser]


def test_a_canary_rated_down_by_users_is_rolled_back_on_its_own(live, tmp_path, browser):
    svc = own_store(live, tmp_path, canary_check_s=1, canary_min_rated=1000)
    for name in ("control-1", "canary-1"):
        adapters.register(svc.engine, svc.settings, live.base_model, build_lora(live.base_model, tmp_path / name, r=8), name=name)
    svc.promote("control-1")
    scheduler = svc.start_scheduler()
    try:
        with serve_app(svc) as url, httpx.Client(base_url=url, timeout=300) as api:
            started = api.post("/api/canary/start", json={"name": "canary-1", "share": 0.5})
            assert started.status_code == 200, started.text
            cid = started.json()["id"]
            down = {"canary-1": itertools.cycle([True, True, True, True, False]),  # 80% thumbs-down
                    "control-1": itertools.cycle([True, False, False, False, False])}  # 20%

            def conversation(i: int) -> str:
                r = api.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": f"Say a word, {i}."}],
                                                          "max_tokens": 2, "temperature": 0})
                assert r.status_code == 200, r.text
                body = r.json()
                rating = "down" if next(down[body["model"]]) else "up"
                assert api.post("/api/feedback", json={"message_id": body["tuneloop"]["message_id"], "rating": rating}).status_code == 200
                return body["model"]

            served: list[str] = []
            with ThreadPoolExecutor(4) as pool:
                for batch in range(8):  # until the check rolls it back: about 20 rated answers per arm suffice
                    served += pool.map(conversation, range(20 * batch, 20 * batch + 20))
                    if canary.get(svc.engine, cid).status != "running":
                        break
            ended = wait_until(lambda: (c := canary.get(svc.engine, cid)).status != "running" and c, timeout=30)
            assert ended.status == "rolled_back" and ended.decision["by"] == "automatic", ended.decision
            numbers = ended.decision
            assert numbers["canary"]["rated"] >= 20 and numbers["control"]["rated"] >= 20
            assert numbers["canary"]["rate"] < 0.35 < 0.65 < numbers["control"]["rate"]
            assert numbers["likelihood_ratio"] >= numbers["threshold"]
            assert {"canary-1", "control-1"} == set(served)
            assert adapters.get(svc.engine, "canary-1").status == "rejected"
            report = api.get("/api/canary").json()
            assert report["running"] is None and report["recent"][0]["status"] == "rolled_back"
            assert {v["version"] for v in report["versions"]} == {"canary-1", "control-1"}
            page = browser.new_page()  # the curation page's Canary tab shows how it ended and the live rates
            page.goto(f"{url}/curate/")
            page.get_by_role("tab", name="Canary").click()
            wait_until(lambda: "rolled_back" in page.locator("#canary-state").inner_text(), timeout=60)
            assert "canary-1" in page.locator("#live-rates").inner_text() and page.locator("#rate-plot").is_visible()
            page.close()
            # Every new conversation is the control's again, and the canary leaves vLLM once its answers are done.
            assert {conversation(1000 + i) for i in range(3)} == {"control-1"}
            svc.residency.wait(60)
            assert "canary-1" not in {m["id"] for m in svc.vllm.models()}
            print(f"canary test: {numbers['canary']} vs {numbers['control']}, likelihood ratio {numbers['likelihood_ratio']}, "
                  f"{len(served)} conversations")
    finally:
        scheduler.shutdown(wait=False)
        svc.rollback()
        svc.residency.wait(60)
        for name in ("control-1", "canary-1"):
            if name in {m["id"] for m in svc.vllm.models()}:
                svc.vllm.unload_adapter(name)
