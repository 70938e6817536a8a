"""A canary with real traffic: conversations through the API to the session's vLLM, thumbs through the API,
and the scheduler's check rolling back a canary whose arm users rate down; a canary started by a passed
gate, completed with the CLI, and another stopped in the Canary tab."""

import itertools
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from helpers import build_lora, own_store, serve_app, wait_until

from retrain import cycle, runs
from serve import adapters, canary

pytestmark = [pytest.mark.integration, pytest.mark.browser]


def test_a_canary_rated_down_by_users_is_rolled_back_on_its_own(live, tmp_path, browser, capsys):
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
            with capsys.disabled():
                print(f"\ncanary test: {numbers['canary']} vs {numbers['control']}, likelihood ratio "
                      f"{numbers['likelihood_ratio']}, {len(served)} conversations")
    finally:
        scheduler.shutdown(wait=False)
        svc.rollback()
        svc.residency.wait(60)
        for name in ("control-1", "canary-1"):
            if name in {m["id"] for m in svc.vllm.models()}:
                svc.vllm.unload_adapter(name)


def test_a_passed_version_starts_a_canary_that_curators_complete_or_stop(live, tmp_path, browser):
    """The rest of a canary's life, on the session's vLLM and the real app: the cycle's step after its gate
    passed a version (with the service's own dependencies) starts a canary when CANARY_SHARE > 0, tied to
    the run; `tuneloop adapters canary status` shows it and `complete` promotes it (its version then answers
    every new conversation); a second canary is stopped with the Canary tab's button in Chromium (everyone
    back on the control, the stopped version not rejected and unloaded once its answers end)."""
    svc = own_store(live, tmp_path, canary_share=0.5)
    names = ("control-2", "canary-2", "canary-3")
    for name in names:
        adapters.register(svc.engine, svc.settings, live.base_model, build_lora(live.base_model, tmp_path / name, r=8), name=name)
    svc.promote("control-2")
    try:
        with serve_app(svc) as url, httpx.Client(base_url=url, timeout=300) as api:
            env = {**os.environ, "TUNELOOP_DATA_DIR": str(svc.settings.data_dir), "TUNELOOP_HOST": "127.0.0.1",
                   "TUNELOOP_PORT": str(urlsplit(url).port)}

            def cli(*args: str) -> str:
                done = subprocess.run([str(Path(sys.executable).parent / "tuneloop"), "adapters", "canary", *args], env=env,
                                      capture_output=True, text=True, timeout=300)
                assert done.returncode == 0, done.stdout + done.stderr
                return done.stdout

            def new_conversation(i: int) -> str:
                r = api.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": f"Say a word, {i}."}],
                                                          "max_tokens": 2, "temperature": 0})
                assert r.status_code == 200, r.text
                return r.json()["model"]

            run_id = runs.claim(svc.engine, "canary-cycle")
            assert cycle.promote_or_reject(svc.cycle_deps(), adapters.get(svc.engine, "canary-2"), promote=True) == "canary"
            runs.update(svc.engine, run_id, status="succeeded")
            first = canary.running(svc.engine)
            assert (first.candidate, first.control, first.share, first.run_id) == ("canary-2", "control-2", 0.5, run_id)
            assert adapters.active(svc.engine) == "control-2"
            arms = set()
            for i in range(40):  # each new conversation draws its arm: both appear (the chance that 40 do not: 2e-12)
                arms.add(new_conversation(i))
                if len(arms) == 2:
                    break
            assert arms == {"canary-2", "control-2"}
            status = cli("status")
            assert f"canary {first.id}: canary-2 on 50% of new conversations, against control-2" in status, status
            assert "canary:" in status and "control:" in status, status
            assert cli("complete").strip() == f"canary {first.id} completed; canary-2 is active"
            assert canary.get(svc.engine, first.id).status == "completed" and adapters.active(svc.engine) == "canary-2"
            assert {new_conversation(100 + i) for i in range(4)} == {"canary-2"}

            started = api.post("/api/canary/start", json={"name": "canary-3", "share": 0.5})
            assert started.status_code == 200, started.text
            second = started.json()["id"]
            page = browser.new_page()
            page.goto(f"{url}/curate/")
            page.get_by_role("tab", name="Canary").click()
            wait_until(lambda: "canary-3 on 50%" in page.locator("#canary-state").inner_text(), timeout=60)
            page.locator("#canary-stop").click()
            wait_until(lambda: f"Canary {second} stopped" in page.locator("#canary-message").inner_text(), timeout=60)
            page.locator("#canary-stop").click()  # again: a refusal, said in the message line
            wait_until(lambda: "Refused: no canary is running" in page.locator("#canary-message").inner_text(), timeout=60)
            page.close()
            assert canary.get(svc.engine, second).status == "stopped"
            assert adapters.get(svc.engine, "canary-3").status != "rejected" and adapters.active(svc.engine) == "canary-2"
            assert {new_conversation(200 + i) for i in range(4)} == {"canary-2"}
            svc.residency.wait(60)
            assert "canary-3" not in {m["id"] for m in svc.vllm.models()}
            assert "no canary is running" in cli("status")
    finally:
        if canary.running(svc.engine) is not None:
            svc.end_canary("stop", "test")
        svc.rollback()
        svc.residency.wait(60)
        for name in names:
            if name in {m["id"] for m in svc.vllm.models()}:
                svc.vllm.unload_adapter(name)
