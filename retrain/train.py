"""Train a LoRA (or QLoRA) adapter with TRL's SFTTrainer and PEFT, or every weight (full), in its own process.

Run as: python -m retrain.train SPEC.json
SPEC names the base model, the train/val JSONL files (TRL's conversational prompt/completion
format, so the loss covers only the answer), the output directory and the TrainConfig. Progress
goes to stdout as lines "TUNELOOP_EVENT {json}": {"step", "max_steps", "loss"|"eval_loss", "eta_s"}.
The adapter is saved to OUT/adapter (a full fine-tune to OUT/model, with the tokenizer); the parent registers
it (metadata last, atomic rename).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from settings import TrainConfig


class TrainSpec(BaseModel):
    """One training run: where its files are, and how to train (the settings' TrainConfig)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base_model: str
    train_file: str
    val_file: str | None
    out_dir: str
    preference_file: str | None = None  # rows for config.preference_stage
    config: TrainConfig = Field(default_factory=TrainConfig)

    def dump(self, path: Path) -> None:
        path.write_text(self.model_dump_json())

    @classmethod
    def load(cls, path: Path) -> TrainSpec:
        return cls.model_validate_json(Path(path).read_text())


EVENT = "TUNELOOP_EVENT "  # marks progress lines among whatever else the libraries print


def main_process() -> bool:
    """Under `accelerate launch` every process trains; one reports and saves (RANK is set by the launcher)."""
    return os.environ.get("RANK", "0") == "0"


def emit(**event) -> None:
    if main_process():
        print(EVENT + json.dumps(event), flush=True)


def launch_command(spec_file: Path, processes: int, accelerate_config: str, gpus: int) -> list[str]:
    """How the cycle starts this module: plain Python for one process (CPU, one GPU), else through
    `accelerate launch` (DDP over `processes` GPUs, or what the accelerate config file says)."""
    if processes > 1 and gpus < processes:
        raise ValueError(f"TUNELOOP_ACCELERATE_PROCESSES={processes} needs {processes} GPUs and this host has {gpus}; "
                         "set it to 1 (one process uses every CPU core) or run on a host with the GPUs")
    if processes == 1 and not accelerate_config:
        return [sys.executable, "-m", "retrain.train", str(spec_file)]
    if accelerate_config:  # its own process count stands unless the setting asks for more
        how = ["--config_file", accelerate_config, *(["--num_processes", str(processes)] if processes > 1 else [])]
    else:
        how = ["--multi_gpu", "--num_processes", str(processes)]
    return [sys.executable, "-m", "accelerate.commands.launch", *how, "-m", "retrain.train", str(spec_file)]


def output_dir(out_dir: str | Path, method: str) -> Path:
    """Where the trained version is saved: an adapter, or a full fine-tune's whole model."""
    return Path(out_dir) / ("model" if method == "full" else "adapter")


def sft_config(spec: TrainSpec, gpu: bool, has_val: bool, steps_per_epoch: int, **overrides):
    """tuneloop's training configuration (bench/training.py measures it against TRL's defaults)."""
    from trl import SFTConfig

    # Validation loss a few times per epoch, so that early stopping (patience counted in
    # evaluations) can end a run that stopped improving, and the best checkpoint is kept.
    c = spec.config
    every = max(1, -(-steps_per_epoch // c.evals_per_epoch))

    return SFTConfig(**{**dict(
        output_dir=str(Path(spec.out_dir) / "checkpoints"), num_train_epochs=c.num_train_epochs,
        per_device_train_batch_size=c.per_device_train_batch_size, per_device_eval_batch_size=c.per_device_train_batch_size,
        learning_rate=c.full_learning_rate if c.method == "full" else c.learning_rate, lr_scheduler_type="constant_with_warmup",
        warmup_steps=min(5, steps_per_epoch), max_length=c.max_length, seed=c.seed,
        # TRL defaults to bf16 and gradient checkpointing even on CPU, where bf16 is 50-100x slower
        # and checkpointing only re-computes; a 135M model fits without it.
        bf16=gpu, gradient_checkpointing=False, use_cpu=not gpu,
        eval_strategy="steps" if has_val else "no", save_strategy="steps" if has_val else "no", eval_steps=every, save_steps=every,
        load_best_model_at_end=has_val, metric_for_best_model="eval_loss", greater_is_better=False,
        # A cycle never resumes: checkpoints hold the weights only (a full fine-tune's optimizer state is twice the model).
        save_total_limit=2, save_only_model=True, logging_steps=1, report_to=[], dataloader_num_workers=0,
        disable_tqdm=True,  # progress is reported as events; a bar would garble the log
    ), **overrides})


def sft_trainer(gpu: bool):
    """TRL's SFTTrainer; on CPU, the same trainer with a loss and an attention made for the CPU.

    SFTTrainer computes its loss through a fused LM head that scores the vocabulary in tiles so that
    the full logits are never held (a memory saving meant for GPUs, where it runs in Triton). Without
    Triton the tiles are folded by torch ops, with the entropy and top-1 statistics it logs, and the
    backward scores them again: 45% of a LoRA step on the 2-core CPU (bench/training.py). On CPU the
    LM head runs instead only on the positions that have a label (the answer's tokens: the prompt's
    logits are never needed), and the loss is the same sum of token NLLs over the same count. The
    entropy and token-accuracy log entries are not computed then; loss and eval_loss are unchanged.
    Padding-free batches get packed_attention (below). A subclass, because SFTTrainer.compute_loss always
    runs its fused head (with compute_loss_func it runs both), and the head's positions (logits_to_keep)
    are chosen per batch inside the loss."""
    from trl import SFTTrainer

    if gpu:
        return SFTTrainer

    class CPUSFTTrainer(SFTTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if self.args.padding_free:
                self.model.set_attn_implementation(register_packed_attention())

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return label_loss(model, inputs, num_items_in_batch, return_outputs)

    return CPUSFTTrainer


def label_loss(model, inputs, num_items_in_batch, return_outputs: bool):
    """Causal-LM loss with logits only where a next token has a label: position i predicts token i+1.
    Padding-free rows start with label -100, so no row's last token predicts the next row's first."""
    import torch
    import torch.nn.functional as F

    labels = inputs["labels"]
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    keep = (targets != -100).any(0).nonzero().flatten()
    outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False, logits_to_keep=keep)
    kept = targets[:, keep]
    count = num_items_in_batch if num_items_in_batch is not None else (kept != -100).sum()
    loss = F.cross_entropy(outputs.logits.flatten(0, 1).float(), kept.flatten(), ignore_index=-100,
                           reduction="sum") / torch.as_tensor(count).clamp(min=1)
    return (loss, outputs) if return_outputs else loss


PACKED = "tuneloop_packed_sdpa"


def packed_attention(module, query, key, value, attention_mask, position_ids=None, **kwargs):
    """SDPA over each row of a padding-free batch on its own, causal within the row.

    transformers runs a padding-free batch (rows laid end to end, positions restarting at 0) as one
    sequence under a block-diagonal mask, so attention costs the square of the whole batch's length:
    21% of a LoRA step on the 2-core CPU. Row by row it costs the sum of the rows' squares. Anything
    else (a padded batch, as DPO and KTO use) goes to transformers' SDPA unchanged."""
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    starts = [] if position_ids is None or query.shape[0] != 1 or key.shape[2] != query.shape[2] else \
        (position_ids[0] == 0).nonzero().flatten().tolist()
    if len(starts) < 2 or starts[0] != 0:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    sizes = [b - a for a, b in zip(starts, [*starts[1:], query.shape[2]], strict=True)]
    # split, not slices: the backward of a split is one cat, that of each slice a zero-filled full copy
    out = torch.cat([F.scaled_dot_product_attention(q, k, v, dropout_p=kwargs.get("dropout", 0.0), scale=kwargs.get("scaling"),
                                                    is_causal=True, enable_gqa=True)
                     for q, k, v in zip(query.split(sizes, 2), key.split(sizes, 2), value.split(sizes, 2), strict=True)], dim=2)
    return out.transpose(1, 2).contiguous(), None


def register_packed_attention() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED, packed_attention)
    AttentionMaskInterface.register(PACKED, sdpa_mask)  # the mask padded batches still need
    return PACKED


def batching(longest_row: int, max_length: int) -> dict:
    """Padding-free batches (no pad tokens computed; bench/training.py measures the gain) when no
    row needs truncating: TRL enforces max_length only on padded or packed batches."""
    return dict(padding_free=True, max_length=None) if longest_row <= max_length else {}


def row_tokens(tok, row: dict) -> int:
    """Tokens of a prompt/completion row as TRL tokenizes it: the whole conversation, templated."""
    ids = tok.apply_chat_template([*row["prompt"], *row["completion"]], tokenize=True, return_dict=True)["input_ids"]
    return len(ids)


def lora_config(config: TrainConfig):
    from peft import LoraConfig

    return LoraConfig(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=config.peft_target_modules, task_type="CAUSAL_LM")


def train(spec: TrainSpec) -> Path:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, EarlyStoppingCallback, TrainerCallback
    c = spec.config
    gpu = torch.cuda.is_available()
    data = load_dataset("json", data_files={"train": spec.train_file, **({"val": spec.val_file} if spec.val_file else {})})
    has_val = "val" in data and len(data["val"]) > 0
    tok = AutoTokenizer.from_pretrained(spec.base_model)
    model_kwargs: dict = {"dtype": torch.bfloat16 if gpu else torch.float32}
    if c.method == "qlora":
        from transformers import BitsAndBytesConfig

        model_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if gpu else torch.float32)
    model = AutoModelForCausalLM.from_pretrained(spec.base_model, **model_kwargs)
    longest = max(row_tokens(tok, row) for split in data.values() for row in split)
    config = sft_config(spec, gpu, has_val, steps_per_epoch=max(1, -(-len(data["train"]) // c.per_device_train_batch_size)),
                        **batching(longest, c.max_length))
    emit(batching="padding-free" if config.padding_free else f"padded (a row of {longest} tokens is cut to {c.max_length})")
    lora = lora_config(c) if c.method != "full" else None  # full: every weight trains

    started = time.monotonic()

    class Progress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            done = max(state.global_step, 1)
            eta = (time.monotonic() - started) / done * max(state.max_steps - state.global_step, 0)
            event = {k: round(float(v), 5) for k, v in logs.items() if k in ("loss", "eval_loss", "epoch")}
            if event:
                emit(step=state.global_step, max_steps=state.max_steps, eta_s=round(eta, 1), **event)

    callbacks = [Progress()]
    if has_val:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=c.early_stopping_patience))
    trainer = sft_trainer(gpu)(model=model, args=config, train_dataset=data["train"], eval_dataset=data["val"] if has_val else None,
                               processing_class=tok, peft_config=lora, callbacks=callbacks)
    trainer.train()
    model = trainer.model
    if c.preference_stage != "none" and spec.preference_file:
        model = preference_stage(spec, model, tok, gpu, Progress())
    adapter = output_dir(spec.out_dir, c.method)
    if main_process():
        model.save_pretrained(adapter, safe_serialization=True)
        if c.method == "full":  # vLLM reads the tokenizer and chat template from the model's directory
            tok.save_pretrained(adapter)
    best = trainer.state.best_metric
    emit(done=True, adapter=str(adapter), steps=trainer.state.global_step, best_eval_loss=best,
         seconds=round(time.monotonic() - started, 1))
    return adapter


def preference_stage(spec: TrainSpec, model, tok, gpu: bool, progress):
    """Continue the same adapter on preference data; the adapter-disabled base is the reference."""
    from datasets import load_dataset

    c, stage = spec.config, spec.config.preference_stage
    data = load_dataset("json", data_files=spec.preference_file, split="train")
    if len(data) < 2:
        emit(stage=stage, skipped=f"{len(data)} preference row(s); need at least 2")
        return model
    common = dict(output_dir=str(Path(spec.out_dir) / stage), num_train_epochs=1, learning_rate=c.learning_rate / 4,
                  per_device_train_batch_size=max(2, min(c.per_device_train_batch_size, len(data))), max_length=c.max_length,
                  bf16=gpu, gradient_checkpointing=False, use_cpu=not gpu, logging_steps=1, report_to=[],
                  save_strategy="no", disable_tqdm=True, seed=c.seed)
    if stage == "dpo":
        from trl import DPOConfig, DPOTrainer

        trainer = DPOTrainer(model=model, args=DPOConfig(**common), train_dataset=data, processing_class=tok, callbacks=[progress])
    elif stage == "kto":
        try:
            from trl.experimental.kto import KTOConfig, KTOTrainer
        except ImportError:
            from trl import KTOConfig, KTOTrainer
        trainer = KTOTrainer(model=model, args=KTOConfig(**common), train_dataset=data, processing_class=tok, callbacks=[progress])
    else:
        raise SystemExit(f"preference stage {stage!r}; use none, dpo or kto")
    emit(stage=stage, rows=len(data))
    trainer.train()
    return trainer.model


if __name__ == "__main__":
    train(TrainSpec.load(Path(sys.argv[1])))
