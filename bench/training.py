"""Benchmark: training tokens/s of tuneloop's configuration against TRL's defaults, same data, same run.

Run as: .venv/bin/python bench/training.py [--examples 16]
One epoch of LoRA SFT (rank 8 on every linear layer, batch 8) on the default model per configuration:
  - TRL's defaults: SFTConfig() as it comes (bf16, gradient checkpointing, padded batches);
  - TRL's defaults in float32 (to separate the dtype from checkpointing);
  - tuneloop's configuration as the cycle builds it (retrain.train.sft_config and batching: float32
    on CPU, no checkpointing, padding-free batches since every row fits max_length);
  - the same with padded batches, and with packed (best-fit) batches, to show what each part gives.
tokens/s counts real tokens (no padding). Achieved FLOP/s uses about 4 x 134.5M FLOPs per token
(forward 2N plus activation gradients 2N; LoRA has no weight gradients for the base), against the
CPU's float32 matrix-product peak measured here. Writes bench/results/training.json.
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
DEFAULTS = "TRL defaults (bf16, gradient checkpointing, padded)"
OURS = "tuneloop (float32, no checkpointing, padding-free)"
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


def one_epoch(base: str, data, config, lora) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=AutoTokenizer.from_pretrained(base),
                         peft_config=lora)
    tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    metrics = trainer.train().metrics
    return {"tokens": tokens, "seconds": round(metrics["train_runtime"], 1), "steps": trainer.state.global_step,
            "tok_s": round(tokens / metrics["train_runtime"], 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=16)
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
                    save_strategy="no", disable_tqdm=True)  # equal work and batch order; no checkpoints written
        tok = AutoTokenizer.from_pretrained(base)  # once, not per row
        longest = max(row_tokens(tok, row) for row in data)
        configs = {
            DEFAULTS: SFTConfig(output_dir=f"{tmp}/d", use_cpu=True, **same),
            "TRL defaults in float32": SFTConfig(output_dir=f"{tmp}/f", use_cpu=True, bf16=False, **same),
            OURS: sft_config(spec, False, False, steps, **batching(longest, spec.config.max_length), **same),
            "tuneloop with padded batches": sft_config(spec, False, False, steps, **same),
            "tuneloop with packed batches (bfd)": sft_config(spec, False, False, steps, packing=True, packing_strategy="bfd", **same),
        }
        if args.one is not None:  # a child: accelerate's state is per process, and bf16 cannot be undone in it
            label, config = list(configs.items())[args.one]
            print("RESULT " + json.dumps(one_epoch(base, data, config, lora_config(spec.config))), flush=True)
            return
        for i, label in enumerate(configs):
            child = subprocess.run([sys.executable, __file__, "--examples", str(args.examples), "--one", str(i)],
                                   capture_output=True, text=True)
            found = [ln for ln in child.stdout.splitlines() if ln.startswith("RESULT ")]
            if not found:
                sys.exit(f"{label} failed:\n{child.stderr[-3000:]}")
            results[label] = json.loads(found[-1][7:])
            results[label]["achieved_flop_s"] = 4 * 134.5e6 * results[label]["tok_s"]
            results[label]["of_peak"] = round(results[label]["achieved_flop_s"] / peak, 3)
            print(json.dumps({label: results[label]}), flush=True)
    default, ours = results[DEFAULTS]["tok_s"], results[OURS]["tok_s"]
    out = {"benchmark": "training", "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "examples": args.examples, "configs": results, "matmul_peak_flop_s": peak,
           "speedup_vs_trl_defaults": round(ours / default, 2), "target_speedup": TARGET_SPEEDUP,
           "speedup_vs_trl_defaults_in_float32": round(ours / results["TRL defaults in float32"]["tok_s"], 2),
           "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    (ROOT / "bench" / "results" / "training.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
