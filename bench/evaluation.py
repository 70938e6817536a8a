"""Benchmark: score a 200-example test set for two adapters the way a cycle does (retrain.evaluate:
answers from vLLM, concurrent requests; NLL teacher-forced in padded batches; exact match, token F1,
chrF, BLEU), against the baseline a user would write: HF `generate` one example at a time, HF's loss
one example at a time, then the same metrics.

Run as: .venv/bin/python bench/evaluation.py [--cases 200] [--hf-sample 20]
The baseline is sequential, so its time is linear in the number of examples: it is measured on
--hf-sample examples per adapter and scaled to --cases (the JSON keeps both). The adapters have
random B matrices scaled down, so they answer like the base model (about a line), but differently.
Writes bench/results/evaluation.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from cycle import ITEMS  # noqa: E402
from hotswap import random_adapter  # noqa: E402
from ingest import free_port  # noqa: E402

TARGET_SPEEDUP = 3.0
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_cases(n: int):
    from retrain.evaluate import Case

    return [Case([{"role": "user", "content": f"Describe the {ITEMS[i % len(ITEMS)]} number {i} in one line."}],
                 f"RESULT: the {ITEMS[i % len(ITEMS)]} number {i} is noted.") for i in range(n)]


def hf_baseline(base: str, adapter: Path, cases, max_new_tokens: int) -> tuple[list[str], float, float]:
    """What a user would write: generate one example at a time, then HF's own loss one example at a time.

    Returns the answers, the seconds generating and the seconds computing NLL.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(adapter)).eval()
    out = []
    with torch.no_grad():
        started = time.perf_counter()
        for case in cases:
            ids = tok.apply_chat_template(case.prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            done = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
            out.append(tok.decode(done[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
        generated = time.perf_counter()
        for case in cases:
            prompt = tok.apply_chat_template(case.prompt, add_generation_prompt=True, return_dict=True)["input_ids"]
            full = tok.apply_chat_template(case.prompt + [{"role": "assistant", "content": case.reference}],
                                           return_dict=True)["input_ids"]
            labels = [-100] * len(prompt) + full[len(prompt):]
            model(input_ids=torch.tensor([full]), labels=torch.tensor([labels])).loss.item()
    return out, generated - started, time.perf_counter() - generated


def metrics(answers: list[str], cases) -> list[tuple]:
    """The same per-example generation metrics the cycle stores (so both arms do the same work)."""
    import sacrebleu

    from retrain.evaluate import normalize, token_f1

    return [(normalize(a) == normalize(c.reference), token_f1(a, c.reference),
             sacrebleu.sentence_chrf(a, [c.reference]).score, sacrebleu.sentence_bleu(a, [c.reference]).score)
            for a, c in zip(answers, cases, strict=False)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--hf-sample", type=int, default=20)
    args = ap.parse_args()

    from retrain.evaluate import Scorer, nll_for
    from serve import model
    from serve.client import VLLMClient
    from serve.vllm_server import VLLMSupervisor
    from settings import Settings

    load_before = os.getloadavg()
    cases = test_cases(args.cases)
    with tempfile.TemporaryDirectory() as tmp:
        s = Settings(data_dir=Path(tmp) / "data", vllm_port=free_port(), _env_file=None)
        base = str(model.pull(s, progress=False))
        adapters = {f"eval-{i}": random_adapter(base, Path(tmp) / f"eval-{i}", seed=i, targets=ALL_LINEAR, b_scale=0.05)
                    for i in range(2)}

        # Baseline first, while no vLLM process competes for the cores.
        sample = cases[:args.hf_sample]
        hf = {}
        for name, path in adapters.items():
            answers, generate_s, nll_s = hf_baseline(base, path, sample, max_new_tokens=64)
            started = time.perf_counter()
            metrics(answers, sample)
            hf[name] = {"generate_s": round(generate_s, 1), "nll_and_metrics_s": round(nll_s + time.perf_counter() - started, 1),
                        "mean_answer_chars": round(sum(map(len, answers)) / len(answers), 1)}
            print(json.dumps({name: hf[name]}), flush=True)
        hf_total = sum(v["generate_s"] + v["nll_and_metrics_s"] for v in hf.values()) * args.cases / len(sample)

        sup = VLLMSupervisor(s, base, model.served_name(s))
        sup.start()
        try:
            client = VLLMClient(s.served_vllm_url)
            for name, path in adapters.items():
                client.load_adapter(name, str(path))
            nll = nll_for(s, client, base)  # the cycle's own choice: in vLLM with the grouped ops
            scorer = Scorer(client, nll)  # the cycle's own scorer, with its defaults (64 new tokens)
            scorer.score("eval-0", str(adapters["eval-0"]), cases[:2])  # warm both adapters up
            scorer.score("eval-1", str(adapters["eval-1"]), cases[:2])
            ours = {}
            for name, path in adapters.items():
                started = time.perf_counter()
                scored = scorer.score(name, str(path), cases)
                ours[name] = {"seconds": round(time.perf_counter() - started, 1),
                              **{f"{k}_s": round(v, 1) for k, v in scored.seconds.items()},
                              "mean_answer_chars": round(sum(map(len, scored.answers)) / len(cases), 1)}
                print(json.dumps({name: ours[name]}), flush=True)
            client.close()
        finally:
            sup.stop()
    ours_total = sum(v["seconds"] for v in ours.values())
    out = {"benchmark": "evaluation", "cpus": os.cpu_count(), "cases": args.cases, "hf_sample": args.hf_sample,
           "nll_in": type(nll).__name__,
           "tuneloop": ours, "tuneloop_s": round(ours_total, 1), "hf_sequential": hf, "hf_sequential_s_scaled": round(hf_total, 1),
           "speedup": round(hf_total / ours_total, 2), "target_speedup": TARGET_SPEEDUP,
           "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    (ROOT / "bench" / "results" / "evaluation.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the vLLM and app children
    main()
