"""Evaluation's pure parts and the batched teacher-forced NLL, on a tiny real Llama (no vLLM)."""

from __future__ import annotations

import pytest
from helpers import build_lora

from retrain.evaluate import Case, Likelihood, length_batches, normalize, token_f1


def test_length_batches_cover_every_row_once_within_the_budget():
    lengths = [5, 40, 7, 300, 12, 12, 90, 1, 33, 64]
    batches = length_batches(lengths, 100)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 100
    assert [3] in batches  # longer than the budget: alone
    assert length_batches([], 100) == []


def test_token_f1_and_normalize():
    assert normalize("Paris, France!") == "paris france"
    assert token_f1("The capital is Paris.", "the capital is paris") == 1.0
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0
    assert 0 < token_f1("Paris is nice", "Paris") < 1


def _one_at_a_time(model, lik: Likelihood, cases) -> list[float]:
    """The plain reference: HF's own loss on one unpadded sequence at a time."""
    import torch

    out = []
    with torch.no_grad():
        for c in cases:
            full, n_prompt = lik._row(c)
            labels = [-100] * n_prompt + full[n_prompt:]
            out.append(float(model(input_ids=torch.tensor([full]), labels=torch.tensor([labels])).loss))
    return out


@pytest.fixture
def cases():
    # Different prompt and answer lengths, so batches are padded and sorted.
    return [Case([{"role": "user", "content": "Hello " * n}], "The quick brown fox jumps. " * (1 + n % 3))
            for n in (1, 9, 3, 20, 2, 14, 5)]


def test_batched_nll_equals_one_sequence_at_a_time(tiny_model, tmp_path, cases, monkeypatch):
    from peft import PeftModel

    import retrain.evaluate as evaluate

    monkeypatch.setattr(evaluate, "NLL_TOKENS_PER_BATCH", 120)  # several batches of several rows
    lik = Likelihood(str(tiny_model))
    assert len(length_batches([len(lik._row(c)[0]) for c in cases], 120)) > 1

    base = lik.score("tiny", None, cases)
    assert base == pytest.approx(_one_at_a_time(lik.base, lik, cases), abs=1e-4)

    adapter = build_lora(tiny_model, tmp_path / "lora")
    tuned = lik.score("tiny-lora", str(adapter), cases)
    reference = PeftModel.from_pretrained(lik.base, str(adapter))
    assert tuned == pytest.approx(_one_at_a_time(reference, lik, cases), abs=1e-4)
    lik.base = reference.unload()
    assert max(abs(a - b) for a, b in zip(base, tuned, strict=False)) > 1e-3  # the adapter changed the scores

    assert lik.score("tiny", None, cases) == pytest.approx(base, abs=1e-6)  # the adapter was taken out again
