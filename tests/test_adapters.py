"""Adapter validation and the registry, on a tiny real Llama (no vLLM: client None flips the DB only)."""

import json
import os
import shutil

import pytest
from helpers import build_lora, build_tiny_llama
from sqlmodel import select

from data_store.db import session
from data_store.models import Adapter
from serve import adapters
from serve.adapters import AdapterError


@pytest.fixture(scope="module")
def good_adapter(tiny_model, tmp_path_factory):
    return build_lora(tiny_model, tmp_path_factory.mktemp("lora") / "good")


@pytest.fixture
def copy(good_adapter, tmp_path):
    def make(name="copy"):
        dest = tmp_path / name
        shutil.copytree(good_adapter, dest)
        return dest
    return make


def test_valid_adapter_passes(good_adapter, settings, tiny_model):
    info = adapters.validate(good_adapter, settings, str(tiny_model))
    assert info.rank == 4 and set(info.target_modules) == {"q_proj", "v_proj"}


def test_truncated_safetensors_rejected(copy, settings, tiny_model):
    d = copy()
    f = d / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(AdapterError, match="truncated"):
        adapters.validate(d, settings, str(tiny_model))


def test_rank_above_limit_rejected(tiny_model, tmp_path, settings):
    d = build_lora(tiny_model, tmp_path / "big", r=32)
    with pytest.raises(AdapterError, match="rank 32, above the limit 16"):
        adapters.validate(d, settings, str(tiny_model))


def test_modules_to_save_rejected(copy, settings, tiny_model):
    d = copy()
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["modules_to_save"] = ["lm_head"]
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="modules_to_save"):
        adapters.validate(d, settings, str(tiny_model))


def test_pickle_weights_rejected(copy, settings, tiny_model):
    d = copy()
    (d / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(AdapterError, match="pickle"):
        adapters.validate(d, settings, str(tiny_model))


def test_wrong_base_model_rejected_by_shape(tmp_path, settings, good_adapter):
    other = build_tiny_llama(tmp_path / "tiny-llama", hidden=96)  # same name, other shapes
    with pytest.raises(AdapterError, match="does not fit"):
        adapters.validate(good_adapter, settings, str(other))


def test_wrong_base_model_rejected_by_name(copy, settings, tiny_model):
    d = copy()
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "meta-llama/Llama-3-70B"
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="trained on 'meta-llama/Llama-3-70B'"):
        adapters.validate(d, settings, str(tiny_model))


@pytest.mark.parametrize("name", ["../../etc", "/abs/path", "a/b", "..", "", "x" * 80, "név", "a b", ".hidden"])
def test_bad_names_rejected(name, engine, settings, tiny_model, good_adapter):
    with pytest.raises(AdapterError, match="not allowed"):
        adapters.register(engine, settings, str(tiny_model), good_adapter, name=name)
    assert not list(settings.adapters_dir.glob("*")) if settings.adapters_dir.exists() else True


def test_register_makes_an_immutable_version(engine, settings, tiny_model, good_adapter):
    row = adapters.register(engine, settings, str(tiny_model), good_adapter)
    assert row.name == "v0001"
    d = settings.adapters_dir / "v0001"
    assert sorted(p.name for p in d.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "tuneloop-adapter.json"]
    assert not os.access(d / "adapter_model.safetensors", os.W_OK) or os.geteuid() == 0
    assert oct((d / "adapter_model.safetensors").stat().st_mode & 0o777) == "0o444"
    assert not list(settings.adapters_dir.glob(".staging-*"))
    assert adapters.register(engine, settings, str(tiny_model), good_adapter).name == "v0002"


def test_names_are_never_reused(engine, settings, tiny_model, good_adapter):
    adapters.register(engine, settings, str(tiny_model), good_adapter, name="mine")
    with pytest.raises(AdapterError, match="taken"):
        adapters.register(engine, settings, str(tiny_model), good_adapter, name="mine")


def test_bad_adapter_leaves_nothing_behind(engine, settings, tiny_model, copy):
    d = copy()
    (d / "adapter_model.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(AdapterError):
        adapters.register(engine, settings, str(tiny_model), d, name="broken")
    with session(engine) as s:
        assert s.exec(select(Adapter)).all() == []
    assert not (settings.adapters_dir / "broken").exists()


def test_promote_and_rollback_follow_the_deployment_log(engine, settings, tiny_model, good_adapter):
    for name in ("a1", "a2"):
        adapters.register(engine, settings, str(tiny_model), good_adapter, name=name)
    assert adapters.active(engine) is None
    with pytest.raises(AdapterError, match="nothing to roll back: .*no version was ever promoted"):
        adapters.rollback(engine, None, settings)
    adapters.promote(engine, None, settings, "a1")
    adapters.promote(engine, None, settings, "a2")
    assert adapters.active(engine) == "a2"
    assert adapters.rollback(engine, None, settings) == "a1"
    assert adapters.active(engine) == "a1"
    assert adapters.rollback(engine, None, settings) is None
    assert adapters.active(engine) is None
    with pytest.raises(AdapterError, match="nothing to roll back: .*every promotion has been rolled back already"):
        adapters.rollback(engine, None, settings)
    with pytest.raises(AdapterError, match="no adapter named"):
        adapters.promote(engine, None, settings, "nope")


def test_automatic_names_skip_names_users_chose(engine, settings, tiny_model, good_adapter):
    adapters.register(engine, settings, str(tiny_model), good_adapter, name="v0002")
    assert adapters.next_name(engine) == "v0003"  # not the row count plus one, which is taken
    row = adapters.register(engine, settings, str(tiny_model), good_adapter)
    assert row.name == "v0003" and adapters.next_name(engine) == "v0004"
