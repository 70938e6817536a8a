"""Helpers the test modules share (conftest.py holds only fixtures): tiny real models and adapters, the
real web app on a loopback port, stored turns and feedback, the scheduler's real firing."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import uvicorn
from sqlmodel import func, select

from data_store.db import make_engine, migrate, session
from data_store.models import Conversation, Message
from feedback import record as feedback
from retrain import runs, schedule
from serve.services import build
from serve.web import build_app
from settings import Settings

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = ["What is the capital of France? The capital of France is Paris.", "Hello, how are you today?",
          "Answer with one word: yes or no.", "The quick brown fox jumps over the lazy dog."] * 20
QUESTION = "What is the capital of France?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError("condition not met in time")


# ---- real models and adapters, built in-process (torch and friends load only when one is built) ----

def build_tiny_llama(path: Path, hidden: int = 64, layers: int = 2) -> Path:
    """A real Llama with a real byte-level BPE tokenizer, trained here: no downloads."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(CORPUS, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<unk>", pad_token="<|im_end|>")
    tok.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def build_lora(base: Path, out: Path, r: int = 4, **config) -> Path:
    """A PEFT LoRA adapter for `base` with non-zero weights (so it is not a no-op)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base)
    lora = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **config)
    get_peft_model(model, lora).save_pretrained(out)
    return out


def train_lora(base: str, out: Path, pairs: list[tuple[str, str]], steps: int = 30, r: int = 8, lr: float = 3e-3) -> Path:
    """A small LoRA adapter trained with PEFT in-process, for tests that need one that really learned."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
    batches = []
    for prompt, answer in pairs:
        chat = [{"role": "user", "content": prompt}]
        p = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        full = tok.apply_chat_template(chat + [{"role": "assistant", "content": answer}], tokenize=True, return_dict=True)["input_ids"]
        labels = [-100] * len(p) + full[len(p):]  # learn the answer, not the question
        batches.append((torch.tensor([full]), torch.tensor([labels])))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        ids, labels = batches[step % len(batches)]
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    return out


# ---- the real app ----

@contextmanager
def serve_app(services):
    """The real web app (API + Gradio) for `services` on a loopback port, in a thread of this process."""
    port = free_port()
    config = uvicorn.Config(build_app(services), host="127.0.0.1", port=port, log_level="warning",
                            proxy_headers=False)  # as `tuneloop serve` runs it
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.started, "the web app did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def services_for(settings: Settings, engine, client, base_model: str):
    """Services over another store that share the session's vLLM client."""
    return build(settings, engine, client, base_model)


def own_store(live, tmp_path: Path, database_url: str = "", **overrides):
    """A fresh store beside the session's, served by the same vLLM."""
    settings = live.settings.model_copy(update={"data_dir": tmp_path / "data", "database_url": database_url, **overrides})
    migrate(settings.db_url)
    engine = make_engine(settings.db_url)
    return services_for(settings, engine, live.vllm, live.base_model)


def answer(svc) -> tuple[str, str]:
    """(adapter that answered, answer) for the capital question, greedy."""
    turn = svc.chat.complete([{"role": "user", "content": QUESTION}], author="tester", params={"temperature": 0, "max_tokens": 12})
    return turn.adapter, turn.content


# ---- rows in the store ----

def count(engine, table, *where) -> int:
    with session(engine) as s:
        q = select(func.count()).select_from(table)
        for w in where:
            q = q.where(w)
        return s.exec(q).one()


def add_turn(engine, answer="The capital of France is Paris.", author="alice") -> int:
    """A stored question and answer in a conversation of `author` (who alone may give it feedback)."""
    with session(engine) as s:
        c = Conversation(source="ui", author=author)
        s.add(c)
        s.flush()
        s.add(Message(conversation_id=c.id, position=0, role="user", content="What is the capital of France?"))
        m = Message(conversation_id=c.id, position=1, role="assistant", content=answer)
        s.add(m)
        s.flush()
        return m.id


def corrected(engine, settings, author="alice", answer="Lyon is the capital.", question=None):
    mid = add_turn(engine, answer, author=author)
    return feedback.record(engine, settings, mid, rating="down", correction="Paris is the capital of France.", author=author)


# ---- the schedule ----

def recording_firing(settings: Settings):
    """The stored job's real firing (slot, claim, skip rows) with a cycle that only records it ran."""
    engine = make_engine(settings.db_url)
    return schedule.firing(settings, engine, lambda run_id: runs.update(engine, run_id, status="succeeded"))


def app_was_down_at_the_cron_time(tmp_path, monkeypatch):
    """A store holding the job, fallen due 30 minutes ago; returns the settings and a paused
    scheduler that keeps it stored and unfired (a shutdown now would consume the firing)."""
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.background import BackgroundScheduler

    monkeypatch.setenv("TUNELOOP_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("TUNELOOP_SCHEDULE", f"{(datetime.now(UTC) - timedelta(minutes=30)).minute} * * * *")
    settings = Settings()
    migrate(settings.db_url)
    setup = BackgroundScheduler(jobstores={"default": SQLAlchemyJobStore(url=settings.db_url, tablename="apscheduler_jobs")}, timezone=UTC)
    setup.add_job(schedule.JOB, schedule.trigger(settings), id=schedule.JOB_ID,
                  next_run_time=datetime.now(UTC) - timedelta(minutes=30))
    setup.start(paused=True)
    return settings, setup
