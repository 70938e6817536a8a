"""Shared fixtures: real SQLite files, a tiny real Llama built in-process, one real vLLM per session."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from settings import Settings

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = ["What is the capital of France? The capital of France is Paris.", "Hello, how are you today?",
          "Answer with one word: yes or no.", "The quick brown fox jumps over the lazy dog."] * 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(data_dir=tmp_path / "data", vllm_mode="external", vllm_url=f"http://127.0.0.1:{free_port()}",
                    _env_file=None)


@pytest.fixture
def engine(settings):
    from data_store.db import make_engine, migrate

    migrate(settings.db_url)
    eng = make_engine(settings.db_url)
    yield eng
    eng.dispose()


# ---- integration tier: the real default model in a real vLLM server ----

@pytest.fixture(scope="session")
def default_model() -> str:
    from serve import model

    base = Settings()
    return str(model.pull(base, progress=False))


@pytest.fixture(scope="session")
def live(tmp_path_factory, default_model):
    """One vLLM server and one store for the whole session (vLLM takes about a minute to start)."""
    from data_store.db import make_engine, migrate
    from serve import model
    from serve.client import VLLMClient
    from serve.services import build
    from serve.vllm_server import VLLMSupervisor

    data = tmp_path_factory.mktemp("live")
    s = Settings(data_dir=data / "data", vllm_port=free_port(), max_new_tokens=64)
    migrate(s.db_url)
    eng = make_engine(s.db_url)
    client = VLLMClient(s.served_vllm_url)
    services = build(s, eng, client, default_model)
    services.supervisor = VLLMSupervisor(s, default_model, model.served_name(s), on_ready=services.reload_active)
    services.supervisor.start()
    yield services
    services.supervisor.stop()
    client.close()


@contextmanager
def serve_app(services):
    """The real web app (API + Gradio) for `services` on a loopback port, in a thread of this process."""
    import uvicorn

    from serve.web import build_app

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
    from serve.services import build

    return build(settings, engine, client, base_model)


@pytest.fixture(scope="session")
def live_url(live):
    with serve_app(live) as url:
        yield url


@pytest.fixture
def pg_url():
    """A fresh, empty PostgreSQL database for one test (`make test` starts the server on loopback)."""
    import os
    import uuid

    import sqlalchemy as sa

    admin_url = os.environ.get("TUNELOOP_TEST_PG_URL")
    if not admin_url:
        pytest.fail("TUNELOOP_TEST_PG_URL is not set; run the tests with `make test`, which starts PostgreSQL and sets it")
    name = f"tuneloop_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    yield admin_url.rsplit("/", 1)[0] + "/" + name
    with admin.connect() as c:
        c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()
