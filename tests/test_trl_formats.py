"""TRL's trainers accept our exported files as they are: two steps each on the tiny model."""

import pytest

from feedback import curation
from feedback import record as feedback
from retrain import examples, export

QUESTIONS = ["What is the capital of France?", "Name a primary colour.", "How many legs does a spider have?",
             "What is two plus two?", "Which planet is the largest?", "What do bees make?"]


@pytest.fixture
def exported(engine, settings, tmp_path):
    settings.split_ratios = (0.98, 0.01, 0.01)  # everything into train, for a quick check
    from data_store.db import session
    from data_store.models import Conversation, Message

    for i, q in enumerate(QUESTIONS):
        with session(engine) as s:
            c = Conversation(source="api", author=f"user{i}")
            s.add(c)
            s.flush()
            s.add(Message(conversation_id=c.id, position=0, role="user", content=q))
            m = Message(conversation_id=c.id, position=1, role="assistant", content=f"wrong answer {i}")
            s.add(m)
            s.flush()
            mid = m.id
        fb = feedback.record(engine, settings, mid, rating="down", correction=f"right answer {i}", author=f"user{i}")
        curation.approve(engine, settings, fb.id)
    built = examples.build(engine)
    assert len(built.splits["train"]) >= 4
    return {fmt: export.write(built, fmt, "train", tmp_path / f"{fmt}.jsonl") and tmp_path / f"{fmt}.jsonl"
            for fmt in ("sft", "dpo", "kto")}


def common(tmp_path):
    return dict(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
                use_cpu=True, bf16=False, gradient_checkpointing=False, report_to=[], save_strategy="no", logging_steps=1)


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def changed(before, model) -> bool:
    return any(not (before[n] == p.detach()).all() for n, p in model.named_parameters() if n in before)


def test_sft_trainer_accepts_export(exported, tiny_model, tmp_path):
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    before = weights(model)
    trainer = SFTTrainer(model=model, args=SFTConfig(**common(tmp_path), max_length=128),
                         train_dataset=load_dataset("json", data_files=str(exported["sft"]), split="train"),
                         processing_class=AutoTokenizer.from_pretrained(tiny_model))
    trainer.train()
    assert trainer.state.global_step == 2 and changed(before, model)


def test_dpo_trainer_accepts_export(exported, tiny_model, tmp_path):
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    before = weights(model)
    trainer = DPOTrainer(model=model, args=DPOConfig(**common(tmp_path), max_length=128),
                         train_dataset=load_dataset("json", data_files=str(exported["dpo"]), split="train"),
                         processing_class=AutoTokenizer.from_pretrained(tiny_model))
    trainer.train()
    assert trainer.state.global_step == 2 and changed(before, model)


def test_kto_trainer_accepts_export(exported, tiny_model, tmp_path):
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        from trl.experimental.kto import KTOConfig, KTOTrainer
    except ImportError:  # older TRL kept it at the top level
        from trl import KTOConfig, KTOTrainer

    data = load_dataset("json", data_files=str(exported["kto"]), split="train")
    assert set(data["label"]) == {True, False}
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    before = weights(model)
    trainer = KTOTrainer(model=model, args=KTOConfig(**common(tmp_path), max_length=128),
                         train_dataset=data, processing_class=AutoTokenizer.from_pretrained(tiny_model))
    trainer.train()
    assert trainer.state.global_step == 2 and changed(before, model)
