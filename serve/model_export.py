"""Export a version for use outside tuneloop: merged full weights, or GGUF for llama.cpp.

GGUF is written with the `gguf` package (no llama.cpp build): Llama-architecture models, the tensors
renamed with gguf's own name map and q/k permuted to GGML's rotary layout as llama.cpp's converter
does, the BPE vocabulary (special tokens CONTROL-typed), merges and chat template included. F32 or F16.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from data_store.errors import Refused
from serve.adapters import is_full


class ExportError(Refused):
    """400: the export cannot be written as asked."""


def merge(base_model: str, adapter_dir: str | None, out_dir: Path) -> Path:
    """base + adapter folded into plain weights (safetensors) with the tokenizer: loads in
    transformers and vLLM like any Hugging Face model. adapter None exports the base model; a full
    fine-tune's directory is exported as it is."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ExportError(f"{out_dir} exists and is not empty; choose a new directory")
    full = adapter_dir is not None and is_full(Path(adapter_dir))  # a full fine-tune: nothing to merge
    model = AutoModelForCausalLM.from_pretrained(adapter_dir if full else base_model, dtype=torch.float32)
    if adapter_dir and not full:
        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    staging = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_model).save_pretrained(staging)
    if out_dir.exists():
        out_dir.rmdir()
    os.replace(staging, out_dir)  # the directory appears complete or not at all
    return out_dir


def _permute(w, n_head: int):
    """HF's rotary layout (halves) to GGML's (interleaved pairs), as llama.cpp's converter does."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _special_ids(model_dir: Path) -> list[int]:
    """The tokenizer's added special tokens (<|im_start|>, <|im_end|>, <|endoftext|>, ...): llama.cpp wants
    them CONTROL-typed, as its own converter types them, or it warns and re-types them at every load."""
    added = json.loads((model_dir / "tokenizer.json").read_text()).get("added_tokens") or []
    return [t["id"] for t in added if t.get("special")]


def to_gguf(model_dir: Path, out_file: Path, dtype: str = "f16") -> Path:
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    model_dir, out_file = Path(model_dir), Path(out_file)
    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("model_type") != "llama":
        raise ExportError(f"GGUF export supports Llama-architecture models; {model_dir} is {cfg.get('model_type')!r}")
    if dtype not in ("f16", "f32"):
        raise ExportError(f"GGUF dtype {dtype!r}; use f16 or f32")
    n_head, n_kv, layers = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"]), cfg["num_hidden_layers"]
    tensors: dict = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(f))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)
    tmp = out_file.with_name(f".{out_file.name}.tmp-{os.getpid()}")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(model_dir.name)
    w.add_context_length(cfg.get("max_position_embeddings", 2048))
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(layers)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-5))
    w.add_rope_freq_base(cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
    w.add_rope_dimension_count(cfg.get("head_dim") or cfg["hidden_size"] // n_head)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
    vocab = gguf.vocab.BpeVocab(model_dir)
    tokens, toktypes = [], []
    for text, _score, ttype in vocab.all_tokens():
        tokens.append(text)
        toktypes.append(ttype)
    for i in _special_ids(model_dir):  # in the main vocabulary, so BpeVocab typed them NORMAL
        toktypes[i] = gguf.TokenType.CONTROL
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm" if "smollm" in model_dir.name.lower() else "default")
    w.add_token_list(tokens)
    w.add_token_types(toktypes)
    gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens)).add_to_gguf(w)
    for name, t in tensors.items():
        if cfg.get("tie_word_embeddings") and name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when there is no output tensor
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ExportError(f"no GGUF name for tensor {name!r}")
        if name.endswith("q_proj.weight"):
            t = _permute(t, n_head)
        elif name.endswith("k_proj.weight"):
            t = _permute(t, n_kv)
        t = t.astype(np.float16 if dtype == "f16" and t.ndim > 1 else np.float32)
        w.add_tensor(new, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, out_file)
    return out_file
