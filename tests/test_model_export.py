"""Export: merged weights answer like base+adapter; the GGUF round-trips through transformers."""

import pytest
import torch
from helpers import build_lora

from serve.model_export import ExportError, merge, to_gguf


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    adapter = build_lora(tiny_model, d / "lora")
    return adapter, merge(str(tiny_model), str(adapter), d / "merged")


def test_merged_weights_equal_base_plus_adapter(tiny_model, exported):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter, merged_dir = exported
    ids = [5, 17, 42, 8, 99]
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert torch.allclose(logits(merged, ids), logits(with_adapter, ids), atol=1e-4)
    assert not torch.allclose(logits(merged, ids), logits(base, ids), atol=1e-4)  # the adapter is in there
    assert (merged_dir / "tokenizer.json").exists() and (merged_dir / "model.safetensors").exists()


@pytest.mark.parametrize("dtype,atol", [("f32", 1e-4), ("f16", 5e-2)])
def test_gguf_round_trips_through_transformers(exported, tmp_path, dtype, atol):
    from transformers import AutoModelForCausalLM

    _, merged_dir = exported
    out = to_gguf(merged_dir, tmp_path / f"model-{dtype}.gguf", dtype)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)
    ids = [5, 17, 42, 8, 99, 3]
    assert torch.allclose(logits(back, ids), logits(AutoModelForCausalLM.from_pretrained(merged_dir), ids), atol=atol)


def test_merge_refuses_a_non_empty_target(tiny_model, exported):
    adapter, merged_dir = exported
    with pytest.raises(ExportError, match="not empty"):
        merge(str(tiny_model), str(adapter), merged_dir)
