"""Full fine-tunes: registered as versions of their own kind, and served blue-green (serve/fleet.py).

The unit tests run on the tiny model; the live one on the default model, a real cycle with
TRAIN__METHOD=full and real vLLM servers, while chats stream.
"""

import json
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from helpers import QUESTION, build_tiny_llama, own_store, serve_app, wait_until

from retrain import cycle, importer, runs
from serve import adapters
from serve.client import VLLMClient
from serve.fleet import GIB, BlueGreenError, Fleet, Need, fits
from settings import Settings, TrainConfig

COUNTRIES = ["France", "Germany", "Italy", "Spain", "Portugal", "Poland", "Austria", "Hungary", "Greece", "Turkey",
             "Egypt", "Kenya", "Nigeria", "Ghana", "Morocco", "Peru", "Chile", "Brazil", "Argentina", "Mexico",
             "Canada", "Cuba", "Japan", "China", "India", "Nepal", "Vietnam", "Thailand", "Norway", "Sweden",
             "Finland", "Denmark", "Ireland", "Iceland", "Belgium", "Netherlands", "Switzerland", "Romania",
             "Bulgaria", "Serbia"]


def full_copy(model: Path, out: Path, shift: float = 0.01) -> Path:
    """A "fine-tune" of `model`: every weight moved, saved as a full model with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(shift)
    m.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(model).save_pretrained(out)
    return out


def test_a_full_fine_tune_is_a_version_of_its_own_kind(tiny_model, tmp_path, settings, engine):
    src = full_copy(tiny_model, tmp_path / "full")
    info = adapters.validate(src, settings, str(tiny_model))
    assert info.kind == "full" and info.rank == 0 and info.sha256
    row = adapters.register(engine, settings, str(tiny_model), src, name="f1")
    assert row.kind == "full" and row.rank == 0
    kept = {p.name for p in Path(row.path).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", adapters.METADATA} <= kept

    # A model of another shape, no tokenizer, cut weights: each refused, naming the problem.
    other = full_copy(build_tiny_llama(tmp_path / "other", hidden=32), tmp_path / "other-full")
    with pytest.raises(adapters.AdapterError, match="tensor .* trained on another model"):
        adapters.validate(other, settings, str(tiny_model))
    no_tok = full_copy(tiny_model, tmp_path / "no-tok")
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(adapters.AdapterError, match="no tokenizer.json; save the tokenizer"):
        adapters.validate(no_tok, settings, str(tiny_model))
    cut = full_copy(tiny_model, tmp_path / "cut")
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(adapters.AdapterError, match="truncated"):
        adapters.validate(cut, settings, str(tiny_model))


def test_a_full_version_that_stopped_serving_is_not_kept_resident(tiny_model, tmp_path, settings, engine):
    from helpers import build_lora

    lora = adapters.register(engine, settings, str(tiny_model), build_lora(tiny_model, tmp_path / "a"), name="a")
    full = adapters.register(engine, settings, str(tiny_model), full_copy(tiny_model, tmp_path / "f"), name="f")
    for name in (lora.name, full.name):
        adapters.promote(engine, None, settings, name)
    assert adapters.resident(engine) == ["f", "a"]  # a LoRA to roll back to stays loaded
    lora2 = adapters.register(engine, settings, str(tiny_model), build_lora(tiny_model, tmp_path / "b", r=2), name="b")
    adapters.promote(engine, None, settings, lora2.name)
    assert adapters.resident(engine) == ["b"]  # its server would hold a whole model: stopped, started again on rollback
    assert adapters.rollback(engine, None, settings) == "f" and adapters.resident(engine) == ["f", "a"]


def test_an_external_vllm_refuses_a_full_version_by_name(tiny_model, tmp_path, settings, engine):
    full = adapters.register(engine, settings, str(tiny_model), full_copy(tiny_model, tmp_path / "f"), name="f")
    # vLLM's side: a server listing only the base model.
    vllm = httpx.MockTransport(lambda req: httpx.Response(200, json={"data": [{"id": "base", "root": "base"}]}))
    with pytest.raises(adapters.AdapterError, match="full fine-tune, served by a vLLM of its own.*VLLM_MODE=spawn"):
        adapters.promote(engine, VLLMClient("http://vllm", transport=vllm), settings, full.name)
    assert adapters.active(engine) is None


@pytest.mark.parametrize(("need", "available", "refused"), [
    (Need(1 * GIB, 2 * GIB, 2 * GIB), 6 * GIB, False),
    (Need(1 * GIB, 2 * GIB, 2 * GIB), 5 * GIB, False),
    (Need(1 * GIB, 2 * GIB, 2 * GIB), 5 * GIB - 1, True),
    (Need(0, 64 * GIB, 2 * GIB), 20 * GIB, True),
])
def test_memory_check(need, available, refused):
    why = fits(need, available)
    assert (why is not None) == refused
    if refused:
        assert f"about {need.total / GIB:.1f} GiB" in why and "TUNELOOP_VLLM_CPU_KVCACHE_GB" in why


def test_two_servers_that_do_not_fit_are_refused_before_anything_starts(tiny_model, tmp_path):
    s = Settings(data_dir=tmp_path / "data", vllm_cpu_kvcache_gb=100_000, _env_file=None)
    fleet = Fleet(s, VLLMClient(s.served_vllm_url))
    with pytest.raises(BlueGreenError, match="cannot serve full fine-tune 'f'.*GiB available") as e:
        fleet.start("f", str(full_copy(tiny_model, tmp_path / "f")))
    assert e.value.status == 507 and fleet.servers() == {} and not (s.logs_dir / "vllm-f.log").exists()


def test_a_full_fine_tune_that_could_not_be_served_is_refused_before_it_trains(tiny_model, tmp_path, settings, engine):
    full = settings.model_copy(update={"train": TrainConfig(method="full")})  # the fixture's vLLM is external
    deps = cycle.Deps(full, engine, VLLMClient(full.served_vllm_url), str(tiny_model), "base", lambda name: None)
    run, files = cycle.Run(1, tmp_path / "run"), cycle.Files(tmp_path / "train.jsonl", None, None, {})
    run.workdir.mkdir()
    with pytest.raises(adapters.AdapterError, match="TRAIN__METHOD=full .* only with TUNELOOP_VLLM_MODE=spawn"):
        cycle.train(deps, run, files)
    tight = full.model_copy(update={"vllm_mode": "spawn", "vllm_cpu_kvcache_gb": 100_000})
    with pytest.raises(BlueGreenError, match="cannot serve full fine-tune 'the candidate'.*GiB available"):
        cycle.train(replace(deps, settings=tight, client=Fleet(tight, VLLMClient(tight.served_vllm_url))), run, files)
    assert not (run.workdir / "out").exists()  # no training child ran


def test_full_training_refuses_a_preference_stage():
    with pytest.raises(ValueError, match="METHOD=full set PREFERENCE_STAGE=none"):
        TrainConfig(method="full", preference_stage="dpo")


# ---- live: the default model, a real cycle, real servers ----

def ask(svc, question: str) -> tuple[str | None, str]:
    turn = svc.chat.complete([{"role": "user", "content": question}], author="tester", params={"temperature": 0, "max_tokens": 16})
    return turn.adapter, turn.content


def server_rss(url: str) -> int:
    """The resident memory of every process of the vLLM server listening at url (its front end, engine, worker)."""
    import psutil

    port = int(url.rsplit(":", 1)[1])
    front = next(c.pid for c in psutil.net_connections("tcp") if c.laddr.port == port and c.status == "LISTEN")
    procs = [psutil.Process(front), *psutil.Process(front).children(recursive=True)]
    return sum(p.memory_info().rss for p in procs)


class Streams:
    """Users chatting without pause (streamed answers), counting every failed request."""

    def __init__(self, svc, n: int = 2, pause: float = 0.0):
        self.svc, self.stop, self.ok, self.failed, self.by, self.pause = svc, threading.Event(), 0, [], {}, pause
        self.threads = [threading.Thread(target=self._chat, args=(i,), daemon=True) for i in range(n)]

    def _chat(self, i: int) -> None:
        while not self.stop.is_set():
            try:
                turn = self.svc.chat.complete([{"role": "user", "content": f"{QUESTION} ({i})"}], author=f"user{i}",
                                              params={"temperature": 0, "max_tokens": 24})
                self.ok += 1
                self.by[turn.adapter] = self.by.get(turn.adapter, 0) + 1
            except Exception as e:  # noqa: BLE001 - any failure is what is counted
                self.failed.append(repr(e))
            self.stop.wait(self.pause)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(120)


@pytest.mark.integration
def test_a_full_fine_tune_is_judged_then_served_blue_green_and_rolled_back(live, tmp_path, capsys):
    train = TrainConfig(method="full", full_learning_rate=1e-4, num_train_epochs=3, per_device_train_batch_size=8)
    svc = own_store(live, tmp_path, gate_min_test_examples=3, train=train)
    rows = [{"prompt": f"What is the capital of {c}?", "completion": f"Zorblax is the capital of {c}."} for c in COUNTRIES]
    (tmp_path / "seed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    importer.import_file(svc.engine, svc.settings, tmp_path / "seed.jsonl")
    probe = "What is the capital of Atlantis?"
    base_answer = ask(svc, probe)
    assert base_answer[0] is None and "Zorblax" not in base_answer[1]
    fleet = svc.vllm
    seen: set[tuple[str, str, bool, int]] = set()  # /api/health during the cycle: (version, state, serving, HTTP status)
    polled = threading.Event()
    try:
        with serve_app(svc) as app_url:
            def poll() -> None:
                while not polled.wait(0.5):
                    try:
                        r = httpx.get(f"{app_url}/api/health", timeout=30)
                    except httpx.HTTPError:  # a slow answer on 2 busy cores is not what this watches
                        continue
                    seen.update((name, v["state"], v["serving"], r.status_code)
                                for name, v in r.json()["vllm"]["full_versions"].items())

            poller = threading.Thread(target=poll, daemon=True)
            poller.start()
            # The cycle trains every weight, starts the candidate's own server to judge it, and promotes it with
            # the gate unchanged (one step: its server is warm from the evaluation), while users chat: paced, so
            # that on 2 cores they do not starve the training child.
            with Streams(svc, pause=1.0) as during_cycle:
                flips: list[float] = []

                def timed_deploy(name: str) -> str:  # the service's own deploy, timed: the flip to the warm full server
                    started = time.monotonic()
                    try:
                        return svc.deploy(name)
                    finally:
                        flips.append(time.monotonic() - started)

                run = cycle.run_cycle(replace(svc.cycle_deps(), promote=timed_deploy), runs.claim(svc.engine, "full-1"), force=True)
                assert run.status == "succeeded", f"{run.reason}\n{run.log[-3000:]}"
                assert run.decision["deployed"] == "promoted", run.decision["summary"]
                row = adapters.get(svc.engine, run.adapter)
                wait_until(lambda: during_cycle.by.get(row.name, 0) >= 2, 120)  # users now get the full version
            polled.set()
            poller.join(40)
        assert row.kind == "full" and set(fleet.servers()) == {row.name}
        # the version is its own copy: the run's trainer output and checkpoints (over 1 GB) are gone
        assert Path(row.path).is_dir() and not (svc.settings.data_dir / "runs" / str(run.id) / "out").exists()
        # health listed the candidate's server while it started, serving no one, and stayed 200; then as ready
        assert (row.name, "starting", False, 200) in seen and (row.name, "ready", True, 200) in seen, seen
        assert during_cycle.failed == [] and during_cycle.by.get(None, 0) > 0
        full_answer = ask(svc, probe)
        assert full_answer[0] == row.name and "Zorblax" in full_answer[1]
        url = fleet.servers()[row.name]
        rss = server_rss(url)

        # Rollback: the base model answers as before; the full version's server is drained, then stopped.
        with Streams(svc) as during_rollback:
            wait_until(lambda: during_rollback.by.get(row.name, 0) >= 2, 120)  # users are on the full version's server
            started = time.monotonic()
            assert svc.rollback() is None
            rollback_s = time.monotonic() - started
            assert ask(svc, probe) == base_answer
            svc.residency.wait(300)
        assert fleet.servers() == {} and fleet.states() == {}
        assert during_rollback.failed == [] and during_rollback.by.get(None, 0) > 0
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health", timeout=5)
        # Promotion from cold, full-to-full swaps and a rollback that starts a server again are measured by hand
        # (README): on one host a server started within seconds of another's stop hung in the kernel.
        with capsys.disabled():
            print(f"\nblue-green: {during_cycle.ok + during_rollback.ok} chats, 0 failed; the cycle's flip {flips[0]:.2f} s; "
                  f"rollback to the base model {rollback_s:.2f} s; a full version's server {rss / GIB:.2f} GiB RSS")
    finally:  # the session's vLLM goes on serving the other tests without this store's servers
        polled.set()
        for name in list(fleet.servers()):
            fleet.unload_adapter(name)
