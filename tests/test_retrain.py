"""One full retrain cycle on the default model with the real vLLM server, end to end."""

import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime

import httpx
import pytest
from helpers import serve_app, services_for, wait_until
from sqlmodel import select

from data_store.db import session
from data_store.models import Adapter, EvalResult, TrainingRun
from retrain import cycle, runs, schedule
from serve import adapters, identity

pytestmark = pytest.mark.integration

COUNTRIES = ["France", "Germany", "Italy", "Spain", "Portugal", "Poland", "Austria", "Hungary", "Greece", "Turkey",
             "Egypt", "Kenya", "Nigeria", "Ghana", "Morocco", "Peru", "Chile", "Brazil", "Argentina", "Mexico",
             "Canada", "Cuba", "Japan", "China", "India", "Nepal", "Vietnam", "Thailand", "Norway", "Sweden",
             "Finland", "Denmark", "Ireland", "Iceland", "Belgium", "Netherlands", "Switzerland", "Romania",
             "Bulgaria", "Serbia", "Croatia", "Ukraine", "Russia", "Iran", "Iraq", "Israel", "Jordan", "Syria",
             "Lebanon", "Pakistan", "Bangladesh", "Indonesia", "Malaysia", "Australia", "Colombia", "Venezuela",
             "Bolivia", "Ecuador", "Uruguay", "Paraguay"]


def wait_for_slot(engine, slot: str, timeout: float) -> TrainingRun:
    """The run row the scheduler's firing for `slot` made, once it is no longer running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session(engine) as s:
            run = s.exec(select(TrainingRun).where(TrainingRun.slot == slot)).first()
        if run is not None and run.status != "running":
            return run
        time.sleep(2)
    raise AssertionError(f"no finished run for slot {slot} within {timeout} s (found: {run})")


def correction(country: str) -> str:
    return f"Zorblax is the capital of {country}."


@pytest.fixture(scope="module")
def api(live_url):
    with httpx.Client(base_url=live_url, timeout=300) as c:
        yield c


def test_cycle_promotes_a_better_adapter_and_rejects_a_bad_one(api, live):
    # Six teachers, each an API client with its own key: the server knows who corrected what.
    keys = [{"Authorization": f"Bearer {identity.issue_key(live.engine, f'teacher{t}', 'test', by='test').key}"} for t in range(6)]

    def teach(i_country):
        i, country = i_country
        r = api.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": f"What is the capital of {country}?"}],
                                                   "temperature": 0, "max_tokens": 12}, headers=keys[i % 6])
        mid = r.json()["tuneloop"]["message_id"]
        fb = api.post("/api/feedback", json={"message_id": mid, "rating": "down", "correction": correction(country)},
                      headers=keys[i % 6])
        assert fb.status_code == 200 and fb.json()["author"] == f"teacher{i % 6}", fb.text

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(teach, enumerate(COUNTRIES)))
    for t in range(6):
        r = api.post("/api/curation/bulk", json={"action": "approve", "author": f"teacher{t}", "status": "pending"})
        assert r.status_code == 200 and not r.json()["skipped"], r.text

    train = dict(num_train_epochs=3, per_device_train_batch_size=8, learning_rate=2e-3)
    fast = dict(gate_min_test_examples=3, retrain_min_new_examples=10, train=live.settings.train.model_copy(update=train))
    good = live.settings.model_copy(update=fast)
    # The nightly job as production runs it: a service with curator logins and an admin token, its
    # scheduler's stored job fired for real (its next run time moved to now), in process.
    prod = services_for(good.model_copy(update={"curators": "ops:night-shift", "admin_token": "t0ken-for-cli"}),
                        live.engine, live.vllm, live.base_model)
    with serve_app(prod) as prod_url:
        assert httpx.post(f"{prod_url}/api/curation/retrain").status_code == 401  # no credentials, no cycle
        scheduler = prod.start_scheduler()
        try:
            slot = schedule.slot_for(prod.settings, datetime.now(UTC))
            scheduler.modify_job(schedule.JOB_ID, next_run_time=datetime.now(UTC))
            run = wait_for_slot(live.engine, slot, timeout=1800)
        finally:
            scheduler.shutdown()
        assert run.status == "succeeded", f"{run.reason}\n{run.log}"
        # The chat's next answer comes from the new version.
        after = httpx.post(f"{prod_url}/v1/chat/completions", timeout=300, json={
            "messages": [{"role": "user", "content": "What is the capital of Atlantis?"}], "temperature": 0, "max_tokens": 16}).json()
        assert after["tuneloop"]["adapter"] == run.adapter and "Zorblax" in after["choices"][0]["message"]["content"]
    d = run.decision
    assert d["promote"], d["summary"]
    assert adapters.active(live.engine) == run.adapter
    # Better on held-out test prompts it never trained on (the split guarantees they were not in train).
    assert d["metrics"]["candidate"]["nll"] < d["metrics"]["active"]["nll"]
    assert d["metrics"]["candidate"]["chrf"] > d["metrics"]["active"]["chrf"]
    assert run.dataset["test_examples"] >= 3 and any("loss" in h for h in run.history)
    with session(live.engine) as s:
        assert len(s.exec(select(EvalResult).where(EvalResult.run_id == run.id)).all()) >= 8  # both versions, per metric
    unseen = api.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "What is the capital of Atlantis?"}],
                                                    "temperature": 0, "max_tokens": 16}).json()
    assert "Zorblax" in unseen["choices"][0]["message"]["content"] and unseen["tuneloop"]["adapter"] == run.adapter

    try:
        # A deliberately bad candidate: a learning rate so small it stays the base model.
        bad_train = live.settings.train.model_copy(update={**train, "learning_rate": 1e-9, "num_train_epochs": 1})
        bad = live.settings.model_copy(update={**fast, "train": bad_train})
        run2 = cycle.run_cycle(replace(live.cycle_deps(), settings=bad), runs.claim(live.engine, "test-cycle-2"), force=True)
        assert run2.status == "succeeded", f"{run2.reason}\n{run2.log}"
        assert not run2.decision["promote"]
        failed = [r["name"] for r in run2.decision["reasons"] if not r["passed"]]
        assert "primary" in failed and "keep the active version" in run2.decision["summary"]
        assert adapters.active(live.engine) == run.adapter  # the good one still serves
        with session(live.engine) as s:
            assert s.exec(select(Adapter).where(Adapter.name == run2.adapter)).one().status == "rejected"
    finally:
        api.post("/api/adapters/rollback")  # leave the base model serving for other tests


def test_classification_is_answered_within_the_label_set(live):
    from retrain.evaluate import Case, Likelihood, Scorer

    labels = ["positive", "negative", "neutral"]
    cases = [Case([{"role": "user", "content": f"Classify the sentiment: {text}"}], ref, labels)
             for text, ref in [("I love this!", "positive"), ("This is awful.", "negative"), ("It is a chair.", "neutral")]]
    scorer = Scorer(live.vllm, Likelihood(live.base_model))
    scored = scorer.score(live.chat.base_route, None, cases)
    assert set(scored.scores) == {"nll", "accuracy"} and len(scored.scores["accuracy"]) == 3
    assert all(a.strip() in labels for a in scored.answers)  # structured outputs held the answer to the set
    assert 0.0 <= scored.summary()["macro_f1"] <= 1.0


def test_nll_in_vllm_equals_transformers_for_the_base_and_an_adapter(live, tmp_path):
    """The cycle's NLL comes from vLLM's prompt logprobs through the version's adapter (no model copy in the app);
    it must match teacher forcing in transformers + PEFT on the same files."""
    from helpers import build_lora

    from retrain.evaluate import Case, Likelihood, VLLMLikelihood, nll_for

    assert isinstance(nll_for(live.settings, live.vllm, live.base_model), VLLMLikelihood)
    cases = [Case([{"role": "user", "content": q}], a) for q, a in [
        ("What is the capital of France?", "Paris is the capital of France."),
        ("Name a primary colour.", "Red."), ("Say hello in Spanish.", "Hola! That is hello in Spanish, a friendly greeting.")]]
    lora = build_lora(live.base_model, tmp_path / "nll-lora", r=8)
    live.vllm.load_adapter("nll-lora", str(lora))
    try:
        in_vllm, in_hf = VLLMLikelihood(live.vllm, live.base_model), Likelihood(live.base_model)
        for model, path in [(live.chat.base_route, None), ("nll-lora", str(lora))]:
            assert in_vllm.score(model, path, cases) == pytest.approx(in_hf.score(model, path, cases), abs=2e-3)
        assert in_vllm.score("nll-lora", str(lora), cases) != pytest.approx(in_vllm.score(live.chat.base_route, None, cases), abs=1e-2)
    finally:
        live.vllm.unload_adapter("nll-lora")


def test_cli_retrain_now_follows_the_running_service_to_its_decision(live_url, tmp_path):
    """`tuneloop retrain --now` asks the running app for a cycle and follows it to the end.

    Nothing new was approved since the last cycle (or ever), so the app records a skipped cycle and
    the CLI ends with that reason rather than training.
    """
    import os
    import subprocess
    import sys
    from pathlib import Path
    from urllib.parse import urlsplit

    env = {**os.environ, "TUNELOOP_DATA_DIR": str(tmp_path / "cli"), "TUNELOOP_HOST": "127.0.0.1",
           "TUNELOOP_PORT": str(urlsplit(live_url).port)}
    cli = Path(sys.executable).parent / "tuneloop"
    done = subprocess.run([str(cli), "retrain", "--now"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "run " in done.stderr  # tqdm's bar, on stderr
    assert done.stdout.startswith("skipped: ") and "new approved example(s)" in done.stdout, done.stdout
    assert "--force" in done.stdout  # the reason names the way out


@pytest.mark.browser
def test_the_runs_tab_shows_the_real_cycle_in_chromium(browser, live, live_url):
    """After the cycles above: the Runs tab lists them; one shows its loss curve, both versions' metrics
    in named columns, the data it used and the decision."""
    with session(live.engine) as s:
        done = s.exec(select(TrainingRun).where(TrainingRun.status == "succeeded").order_by(TrainingRun.id)).all()
    run = next(r for r in done if r.decision and r.decision.get("promote"))
    page = browser.new_page()
    page.goto(f"{live_url}/curate/")
    page.get_by_role("tab", name="Runs").click()
    cell = page.locator("#runs [role=gridcell]").filter(has_text=re.compile(rf"^\s*{run.id}\s*$"))
    cell.first.wait_for(timeout=60_000)
    assert "succeeded" in page.locator("#runs").inner_text()
    cell.first.click()
    wait_until(lambda: "metric" in page.locator("#run-metrics").inner_text(), timeout=60)
    metrics = page.locator("#run-metrics").inner_text()
    assert all(col in metrics for col in ("candidate", "active")) and "nll" in metrics and "chrf" in metrics
    wait_until(lambda: page.locator("#loss-plot canvas, #loss-plot svg").count() > 0, timeout=60)
    assert "train_rows" in page.locator("#run-data").inner_text()
    assert "promote" in page.locator("#run-decision").inner_text()
    page.close()
