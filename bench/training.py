"""Benchmark: training tokens/s of tuneloop's configuration against TRL's defaults, same data, same run.

Run as: .venv/bin/python bench/training.py [--examples 16]
One epoch of LoRA SFT (rank 8 on every linear layer, batch 8) on the default model per configuration:
  - TRL's defaults: SFTConfig() as it comes (bf16, gradient checkpointing, padded batches);
  - TRL's defaults in float32 (to separate the dtype from checkpointing);
  - tuneloop's configuration as the cycle builds it (retrain.train.sft_config and batching: float32
    on CPU, no checkpointing, padding-free batches since every row fits max_length);
  - the same with padded batches, and with packed (best-fit) batches, to show what each part gives.
Then the steady state on --steady-examples rows, timing each step after the first (the first carries
one-time set-up), one after the other: TRL's own SFTTrainer on tuneloop's configuration (its fused LM
head, transformers' attention over the whole padding-free batch); tuneloop's CPU trainer
(retrain.train.sft_trainer: the LM head only where there is a label, attention row by row); the
same with lora_dropout 0.05 (the default before 2026-12-06); and, first, the cycle's trainer as it was
before that day (TRL's SFTTrainer with lora_dropout 0.05), so before and after share one run.
tokens/s counts real tokens (no padding). Achieved FLOP/s uses about 4 x 134.5M FLOPs per token
(forward 2N plus activation gradients 2N; LoRA has no weight gradients for the base), against the
CPU's float32 matrix-product peak measured here. tuneloop's trainer skips the LM head (28.3M of the
134.5M) where no label is, so its FLOPs done are fewer: "done_of_peak" counts only those.
Writes bench/results/training.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET_SPEEDUP = 1.5
TARGET_OF_PEAK = 0.5  # steady state, of the measured fp32 matrix-product peak
FUSED = "TRL's SFTTrainer on tuneloop's configuration"
DROPOUT = "tuneloop with lora_dropout 0.05"
BEFORE = "the cycle's trainer before 2026-12-06 (TRL's SFTTrainer, lora_dropout 0.05)"
LM_HEAD = 576 * 49152  # the tied embedding, as the LM head's matrix product
DEFAULTS = "TRL defaults (bf16, gradient checkpointing, padded)"
OURS = "tuneloop (float32, no checkpointing, padding-free)"
FLOP_PER_TOKEN = 4 * 134.5e6  # see the docstring
THINGS = ["apple", "river", "mountain", "violin", "rocket", "library", "garden", "bicycle", "volcano", "lantern"]


def rows(n: int) -> list[dict]:
    """Conversational prompt/completion rows of uneven length, as curation produces them."""
    out = []
    for i in range(n):
        thing = THINGS[i % len(THINGS)]
        answer = " ".join(f"Fact {k + 1} about the {thing}: it is item {i} and worth noting." for k in range(1 + i % 6))
        out.append({"prompt": [{"role": "user", "content": f"Tell me about the {thing} number {i}."}],
                    "completion": [{"role": "assistant", "content": answer}]})
    return out


def matmul_peak_flops(seconds: float = 3.0, n: int = 2048) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        torch.mm(a, b)
        done += 1
    return 2 * n ** 3 * done / (time.perf_counter() - started)


def one_epoch(base: str, data, config, lora, trl_loss: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTTrainer

    from retrain.train import sft_trainer

    steps: list[list[float]] = []  # per step: seconds, real tokens seen after it

    class StepTimes(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            steps.append([time.perf_counter(), 0.0])

        def on_step_end(self, args, state, control, **kw):
            steps[-1] = [time.perf_counter() - steps[-1][0], float(state.num_input_tokens_seen)]

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cls = SFTTrainer if trl_loss else sft_trainer(gpu=False)
    trainer = cls(model=model, args=config, train_dataset=data, processing_class=AutoTokenizer.from_pretrained(base),
                  peft_config=lora, callbacks=[StepTimes()])
    tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    labelled = sum(sum(x != -100 for x in row) for row in trainer.train_dataset["labels"])
    metrics = trainer.train().metrics
    out = {"tokens": tokens, "label_tokens": labelled, "lm_head_on_labels_only": not trl_loss,
           "seconds": round(metrics["train_runtime"], 1), "steps": trainer.state.global_step,
           "tok_s": round(tokens / metrics["train_runtime"], 1), "first_step_s": round(steps[0][0], 2)}
    if len(steps) > 1:
        out["steady_tok_s"] = round((steps[-1][1] - steps[0][1]) / sum(s for s, _ in steps[1:]), 1)
        out["step_s"] = [round(s, 2) for s, _ in steps]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=16)
    ap.add_argument("--steady-examples", type=int, default=64, help="rows for the steady-state runs (8 per step)")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig

    from retrain.train import TrainSpec, batching, lora_config, row_tokens, sft_config
    from serve import model
    from settings import Settings

    load_before = os.getloadavg()
    base = str(model.pull(Settings(_env_file=None), progress=False))
    data = Dataset.from_list(rows(args.examples))
    peak = matmul_peak_flops() if args.one is None else 0.0
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        spec = TrainSpec(base_model=base, train_file="", val_file=None, out_dir=tmp)
        batch = spec.config.per_device_train_batch_size
        steps = -(-args.examples // batch)
        same = dict(num_train_epochs=1, per_device_train_batch_size=batch, seed=spec.config.seed, report_to=[],
                    save_strategy="no", disable_tqdm=True,  # equal work and batch order; no checkpoints written
                    include_num_input_tokens_seen="non_padding")  # real tokens per step, for the steady state
        tok = AutoTokenizer.from_pretrained(base)  # once, not per row
        longest = max(row_tokens(tok, row) for row in data)
        configs = {
            DEFAULTS: SFTConfig(output_dir=f"{tmp}/d", use_cpu=True, **same),
            "TRL defaults in float32": SFTConfig(output_dir=f"{tmp}/f", use_cpu=True, bf16=False, **same),
            OURS: sft_config(spec, False, False, steps, **batching(longest, spec.config.max_length), **same),
            "tuneloop with padded batches": sft_config(spec, False, False, steps, **same),
            "tuneloop with packed batches (bfd)": sft_config(spec, False, False, steps, packing=True, packing_strategy="bfd", **same),
            FUSED: sft_config(spec, False, False, steps, **batching(longest, spec.config.max_length), **same),
            DROPOUT: sft_config(spec, False, False, steps, **batching(longest, spec.config.max_length), **same),
            BEFORE: sft_config(spec, False, False, steps, **batching(longest, spec.config.max_length), **same),
        }
        trl_loss = {DEFAULTS, "TRL defaults in float32", FUSED, BEFORE}
        if args.one is not None:  # a child: accelerate's state is per process, and bf16 cannot be undone in it
            label, config = list(configs.items())[args.one]
            train = spec.config.model_copy(update={"lora_dropout": 0.05}) if label in (DROPOUT, BEFORE) else spec.config
            print("RESULT " + json.dumps(one_epoch(base, data, config, lora_config(train), label in trl_loss)), flush=True)
            return

        def child(i: int, examples: int) -> dict:
            done = subprocess.run([sys.executable, __file__, "--examples", str(examples), "--one", str(i)],
                                  capture_output=True, text=True)
            found = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
            if not found:
                sys.exit(f"{list(configs)[i]} failed:\n{done.stderr[-3000:]}")
            r = json.loads(found[-1][7:])
            r["achieved_flop_s"] = FLOP_PER_TOKEN * r["tok_s"]
            r["of_peak"] = round(r["achieved_flop_s"] / peak, 3)
            # FLOPs done per token: the LM head's share only on the labelled fraction where it runs only there
            share = r["label_tokens"] / r["tokens"] if r["lm_head_on_labels_only"] else 1.0
            done_per_token = FLOP_PER_TOKEN - 4 * LM_HEAD * (1 - share)
            r["done_of_peak"] = round(done_per_token * r["tok_s"] / peak, 3)
            if "steady_tok_s" in r:
                r["steady_of_peak"] = round(FLOP_PER_TOKEN * r["steady_tok_s"] / peak, 3)
                r["steady_done_of_peak"] = round(done_per_token * r["steady_tok_s"] / peak, 3)
            return r

        for i, label in enumerate(configs):
            if label not in (FUSED, DROPOUT, BEFORE):
                results[label] = child(i, args.examples)
                print(json.dumps({label: results[label]}), flush=True)
        # Steady state, one after the other: the trainer before, TRL's SFTTrainer, tuneloop's CPU trainer, that with dropout.
        steady = {label: child(list(configs).index(label), args.steady_examples) for label in (BEFORE, FUSED, OURS, DROPOUT)}
        print(json.dumps({"steady": steady}), flush=True)
    default, ours = results[DEFAULTS]["tok_s"], results[OURS]["tok_s"]
    out = {"benchmark": "training", "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "examples": args.examples, "configs": results, "matmul_peak_flop_s": peak,
           "speedup_vs_trl_defaults": round(ours / default, 2), "target_speedup": TARGET_SPEEDUP,
           "speedup_vs_trl_defaults_in_float32": round(ours / results["TRL defaults in float32"]["tok_s"], 2),
           "steady_examples": args.steady_examples, "steady": steady, "target_of_peak": TARGET_OF_PEAK,
           "steady_speedup_vs_trl_sft_trainer": round(steady[OURS]["steady_tok_s"] / steady[FUSED]["steady_tok_s"], 2),
           "steady_speedup_vs_lora_dropout": round(steady[OURS]["steady_tok_s"] / steady[DROPOUT]["steady_tok_s"], 2),
           "steady_speedup_vs_before": round(steady[OURS]["steady_tok_s"] / steady[BEFORE]["steady_tok_s"], 2),
           "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    (ROOT / "bench" / "results" / "training.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
