import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from settings import Settings, settings_table

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
        Settings(train_lora_r=64, max_lora_rank=16)


def test_dtype_auto_is_float32_on_cpu():
    assert Settings().resolved_dtype(has_gpu=False) == "float32"
    assert Settings().resolved_dtype(has_gpu=True) == "bfloat16"


def test_readme_settings_table_matches_code():
    text = README.read_text()
    m = re.search(r"<!-- settings-table -->\n(.*?)\n<!-- /settings-table -->", text, re.S)
    assert m, "README lacks the settings table markers"
    assert m.group(1).strip() == settings_table().strip(), "README settings table is stale: paste `tuneloop settings`"
