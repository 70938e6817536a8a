import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from settings import RENAMED, Settings, TrainConfig, settings_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_env_vars_are_read(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNELOOP_PORT", "9999")
    monkeypatch.setenv("TUNELOOP_DATA_DIR", str(tmp_path))
    s = Settings()
    assert s.port == 9999
    assert s.db_url == f"sqlite:///{tmp_path / 'tuneloop.db'}"


def test_toml_file_is_read_and_env_wins(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tuneloop.toml").write_text('port = 8001\nmax_lora_rank = 32\n')
    monkeypatch.setenv("TUNELOOP_PORT", "8002")
    s = Settings()
    assert (s.port, s.max_lora_rank) == (8002, 32)


@pytest.mark.parametrize("var,value,named", [
    ("TUNELOOP_PORT", "not-a-port", "port"),
    ("TUNELOOP_DTYPE", "int3", "dtype"),
    ("TUNELOOP_SCHEDULE", "every night", "schedule"),
    ("TUNELOOP_DATABASE_URL", "mysql://x", "database_url"),
    ("TUNELOOP_VLLM_MODE", "cloud", "vllm_mode"),
])
def test_bad_value_names_the_setting(monkeypatch, var, value, named):
    monkeypatch.setenv(var, value)
    with pytest.raises(ValidationError) as e:
        Settings()
    assert named in {str(err["loc"][0]) for err in e.value.errors()}


def test_unknown_toml_key_is_an_error(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tuneloop.toml").write_text('prot = 8001\n')
    with pytest.raises(ValidationError, match="prot"):
        Settings()


def test_external_mode_needs_url():
    with pytest.raises(ValidationError, match="TUNELOOP_VLLM_URL"):
        Settings(vllm_mode="external")


def test_training_rank_cannot_exceed_serving_limit():
    with pytest.raises(ValidationError, match="max_lora_rank"):
        Settings(train=TrainConfig(r=64), max_lora_rank=16)


def test_training_settings_are_nested_in_env_and_toml(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tuneloop.toml").write_text('[train]\nr = 4\nnum_train_epochs = 1\n')
    monkeypatch.setenv("TUNELOOP_TRAIN__R", "8")
    monkeypatch.setenv("TUNELOOP_TRAIN__TARGET_MODULES", "q_proj, v_proj")
    t = Settings().train
    assert (t.r, t.num_train_epochs, t.lora_alpha) == (8, 1, 32)  # env beats toml, toml beats the default
    assert t.peft_target_modules == ["q_proj", "v_proj"]
    monkeypatch.setenv("TUNELOOP_TRAIN__LORA_R", "8")  # a misspelt field is refused, not ignored
    with pytest.raises(ValidationError, match="lora_r"):
        Settings()


@pytest.mark.parametrize("old,new", [("TUNELOOP_TRAIN_LORA_R", "TUNELOOP_TRAIN__R"),
                                     ("TUNELOOP_TRAIN_EPOCHS", "TUNELOOP_TRAIN__NUM_TRAIN_EPOCHS"),
                                     ("tuneloop_train_batch_size", "TUNELOOP_TRAIN__PER_DEVICE_TRAIN_BATCH_SIZE"),
                                     ("TUNELOOP_TRAIN_PREFERENCE_STAGE", "TUNELOOP_TRAIN__PREFERENCE_STAGE")])
def test_an_old_flat_training_variable_is_refused_with_its_new_name(monkeypatch, old, new):
    monkeypatch.setenv(old, "1")
    with pytest.raises(ValidationError, match=f"{old.upper()} .*was renamed {new}"):
        Settings()


def test_every_old_flat_training_name_is_refused_in_env_and_toml(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tuneloop.toml").write_text("train_seed = 1\n")
    with pytest.raises(ValidationError, match="TUNELOOP_TRAIN_SEED .*was renamed TUNELOOP_TRAIN__SEED"):
        Settings()
    (tmp_path / "tuneloop.toml").unlink()
    for old, new in RENAMED.items():
        assert new in TrainConfig.model_fields
        monkeypatch.setenv(f"TUNELOOP_{old.upper()}", "1")
        with pytest.raises(ValidationError, match=f"TUNELOOP_TRAIN__{new.upper()}"):
            Settings()
        monkeypatch.delenv(f"TUNELOOP_{old.upper()}")


def test_dtype_auto_is_float32_on_cpu():
    assert Settings().resolved_dtype(has_gpu=False) == "float32"
    assert Settings().resolved_dtype(has_gpu=True) == "bfloat16"


def test_readme_settings_table_matches_code():
    text = README.read_text()
    m = re.search(r"<!-- settings-table -->\n(.*?)\n<!-- /settings-table -->", text, re.S)
    assert m, "README lacks the settings table markers"
    assert m.group(1).strip() == settings_table().strip(), "README settings table is stale: paste `tuneloop settings`"
