"""Version registry: validate, store immutable versions, promote and roll back.

A version is a LoRA adapter (loaded into the spawned vLLM at run time) or a full fine-tune (every
weight; served by a vLLM server of its own, started blue-green: serve/fleet.py).
Each version lives in data_dir/adapters/NAME, written to a staging directory and renamed into
place only when complete (metadata last). Names are never reused, because vLLM caches by name.
Which version serves is the newest Deployment row that was not rolled back.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
from contextlib import suppress
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlmodel import func, select

from data_store.db import session
from data_store.errors import Refused
from data_store.models import Adapter, Deployment
from serve.client import VLLMClient, VLLMError
from serve.model import served_name
from settings import Settings

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
METADATA = "tuneloop-adapter.json"
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".ckpt"}
# What a full version's directory keeps: weights, configs and the tokenizer (vLLM reads all from it).
FULL_SUFFIXES = {".safetensors", ".json", ".txt", ".jinja", ".model"}
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


class AdapterError(Refused):
    """400: a bad adapter or request."""


@dataclass(frozen=True)
class AdapterInfo:
    rank: int  # 0: a full fine-tune
    base_model: str
    target_modules: tuple[str, ...]
    sha256: str
    kind: str = "lora"


def is_full(path: Path) -> bool:
    """A whole model's directory (a full fine-tune), not a PEFT adapter's."""
    path = Path(path)
    return (path / "config.json").exists() and not (path / "adapter_config.json").exists()


def check_name(name: str) -> str:
    if not NAME_RE.match(name or "") or ".." in name:
        raise AdapterError(
            f"adapter name {name!r} is not allowed; use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


# ---- validation (reads files, asks nothing of vLLM) ----

def validate(path: Path, settings: Settings, base_model: str, digest: bool = True) -> AdapterInfo:
    """Check a version's directory is something vLLM can load for this base model: a LoRA adapter, or a full
    fine-tune of it. digest=False skips hashing the weights (checked again at each promotion: a full model's
    are hundreds of MB; truncation is still caught by the sizes)."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"{path} is not a directory; give the PEFT adapter directory (with adapter_config.json) or a "
                           "fully fine-tuned model's (with config.json)")
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise AdapterError(f"{path} holds pickle weights ({', '.join(pickles)}), which can run code on load; save with "
                           "safe_serialization=True")
    if is_full(path):
        return _validate_full(path, base_model, digest)
    cfg_file, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg_file.exists():
        raise AdapterError(f"{path} has no adapter_config.json; is it a PEFT adapter directory?")
    if not weights.exists():
        raise AdapterError(f"{path} has no adapter_model.safetensors; save the adapter with safe_serialization=True")
    try:
        cfg = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise AdapterError(f"{cfg_file} is not valid JSON ({e})") from None
    if cfg.get("peft_type") != "LORA":
        raise AdapterError(f"{path} is a {cfg.get('peft_type')!r} adapter; only LoRA adapters can be served")
    rank = int(cfg.get("r", 0))
    if not 1 <= rank <= settings.max_lora_rank:
        raise AdapterError(f"{path} has LoRA rank {rank}, above the limit {settings.max_lora_rank}; retrain with a smaller r or raise "
                           "TUNELOOP_MAX_LORA_RANK")
    if cfg.get("modules_to_save"):
        raise AdapterError(f"{path} has modules_to_save={cfg['modules_to_save']}, which vLLM cannot load; train without modules_to_save")
    trained_on = str(cfg.get("base_model_name_or_path") or "")
    if trained_on and Path(trained_on).name.lower() != Path(base_model).name.lower():
        raise AdapterError(f"{path} was trained on {trained_on!r}, but the service runs {base_model!r}; train it on the served base model")
    shapes = _safetensors_shapes(weights)
    _check_shapes(path, shapes, base_model)
    return AdapterInfo(rank, trained_on or base_model, tuple(sorted(set(cfg.get("target_modules") or []))),
                       _sha256([weights]) if digest else "")


def _validate_full(path: Path, base_model: str, digest: bool) -> AdapterInfo:
    """A full fine-tune of the served base model: its architecture, every tensor's name and shape (so the
    chat template and tokenizer still fit), complete safetensors, and a tokenizer for vLLM to read."""
    try:
        cfg = json.loads((path / "config.json").read_text())
    except ValueError as e:
        raise AdapterError(f"{path / 'config.json'} is not valid JSON ({e})") from None
    missing = [f for f in TOKENIZER_FILES if not (path / f).exists()]
    if missing:
        raise AdapterError(f"{path} has no {', '.join(missing)}; save the tokenizer beside the model (tokenizer.save_pretrained)")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise AdapterError(f"{path} has no .safetensors weights; save the model with safe_serialization=True")
    shapes = {k: v for f in files for k, v in _safetensors_shapes(f).items()}
    architectures, _, tensors, tied = base_shapes(base_model)
    if cfg.get("architectures") != architectures:
        raise AdapterError(f"{path} is a {cfg.get('architectures')} model, but the service runs {base_model!r} "
                           f"({architectures}); fine-tune the served base model")
    if wrong := sorted(k for k in set(shapes) | set(tensors) if shapes.get(k) != tensors.get(k) and k not in tied):
        k = wrong[0]
        raise AdapterError(f"{path}: tensor {k!r} is {shapes.get(k, 'missing')}, but in {base_model} it is "
                           f"{tensors.get(k, 'absent')} ({len(wrong)} differ); was it trained on another model?")
    return AdapterInfo(0, base_model, (), _sha256(files) if digest else "", kind="full")


def _safetensors_shapes(file: Path) -> dict[str, list[int]]:
    """Parse the header and check the file holds every byte it promises (catches truncation)."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise AdapterError(f"{file} is truncated (no header); copy the adapter again")
        (n,) = struct.unpack("<Q", head)
        if n > 100 << 20:
            raise AdapterError(f"{file} has a corrupt header; copy the adapter again")
        if 8 + n > size:
            raise AdapterError(f"{file} is truncated (it ends inside its header); copy the adapter again")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise AdapterError(f"{file} has a corrupt header; copy the adapter again") from None
    header.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + n + end != size:
        raise AdapterError(f"{file} is truncated or padded ({size} bytes, header promises {8 + n + end}); copy the adapter again")
    return {k: t["shape"] for k, t in header.items()}


def _check_shapes(path: Path, shapes: dict[str, list[int]], base_model: str) -> None:
    linears = base_linears(base_model)
    if not shapes:
        raise AdapterError(f"{path} holds no tensors")
    for key, shape in shapes.items():
        m = re.match(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$", key)
        if not m:
            raise AdapterError(f"{path}: unexpected tensor {key!r}; only LoRA A/B weights can be served")
        module, ab = m.groups()
        if module not in linears:
            raise AdapterError(f"{path}: module {module!r} does not exist in {base_model}; was it trained on another model?")
        inp, out = linears[module]
        expected_dim = inp if ab == "A" else out
        got_dim = shape[1] if ab == "A" else shape[0]
        if got_dim != expected_dim:
            raise AdapterError(f"{path}: {key} has shape {shape}, which does not fit {base_model} ({module} is {inp}->{out}); was it "
                               "trained on another model?")


def base_linears(base_model: str) -> dict[str, tuple[int, int]]:
    return base_shapes(base_model)[1]  # every Linear in the base model, by name, with (in, out) features


@lru_cache(maxsize=4)
def base_shapes(base_model: str) -> tuple[list[str], dict[str, tuple[int, int]], dict[str, list[int]], set[str]]:
    """The base model built on the meta device: its architectures, every Linear's (in, out) by name, every saved
    tensor's shape, and the tied ones (an LM head that is the embedding may be absent from a checkpoint)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_model)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tensors = {k: list(v.shape) for k, v in model.state_dict().items()}
    return (config.architectures, {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)},
            tensors, {k for k in tensors if k.startswith("lm_head.")} if config.tie_word_embeddings else set())


def _sha256(files: list[Path]) -> str:
    h = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()


# ---- registry (database and directories) ----

def next_name(engine: Engine) -> str:
    """The next automatic name: one above the highest vNNNN taken, so a name a user chose (`v0007`)
    or a row count that skips never makes a cycle collide with an existing version after training."""
    with session(engine) as s:
        names = s.exec(select(Adapter.name)).all()
    taken = [int(n[1:]) for n in names if re.fullmatch(r"v\d{4,9}", n)]
    return f"v{max(taken, default=0) + 1:04d}"


def register(engine: Engine, settings: Settings, base_model: str, src: Path, name: str | None = None,
             parent: str | None = None, metrics: dict | None = None) -> Adapter:
    """Copy a validated adapter (or full fine-tune) into its own immutable version directory and record it."""
    name = check_name(next_name(engine) if name is None else name)
    if name == served_name(settings):  # vLLM serves the base model by that name: the version would take its traffic
        raise AdapterError(f"adapter name {name!r} is the base model's served name; pick another")
    if find(engine, name):
        raise AdapterError(f"adapter name {name!r} is taken; names are never reused, pick another")
    info = validate(Path(src), settings, base_model)
    dest = settings.adapters_dir / name
    if dest.exists():
        raise AdapterError(f"{dest} already exists; names are never reused, pick another")
    settings.adapters_dir.mkdir(parents=True, exist_ok=True)
    staging = settings.adapters_dir / f".staging-{name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        for f in _files(Path(src), info):
            shutil.copyfile(Path(src) / f, staging / f)
        _check_copy(staging, info)
        meta = {"name": name, "kind": info.kind, "base_model": base_model, "rank": info.rank, "parent": parent,
                "sha256": info.sha256, "target_modules": list(info.target_modules)}
        (staging / METADATA).write_text(json.dumps(meta, indent=2))  # last: marks the copy complete
        for f in staging.iterdir():
            f.chmod(0o444)
        os.rename(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    row = Adapter(name=name, path=str(dest), base_model=base_model, rank=info.rank, kind=info.kind, parent=parent,
                  metrics=metrics or {})
    try:
        with session(engine) as s:
            s.add(row)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return row


def _files(src: Path, info: AdapterInfo) -> list[str]:
    if info.kind == "lora":
        return ["adapter_config.json", "adapter_model.safetensors"]
    return sorted(p.name for p in src.iterdir() if p.is_file() and p.suffix in FULL_SUFFIXES and p.name != METADATA)


def _check_copy(staging: Path, info: AdapterInfo) -> None:
    weights = sorted(staging.glob("*.safetensors")) if info.kind == "full" else [staging / "adapter_model.safetensors"]
    if _sha256(weights) != info.sha256:
        raise AdapterError(f"copy into {staging} does not match the source; check the disk")


def get(engine: Engine, name: str) -> Adapter:
    if (row := find(engine, check_name(name))) is None:  # a hostile name gets the rule, not a lookup
        raise AdapterError(f"no adapter named {name!r}; `tuneloop adapters list` shows the registered ones")
    return row


def find(engine: Engine, name: str) -> Adapter | None:
    """The version with this name, or None; any text may be asked (a bound parameter, never a pattern)."""
    with session(engine) as s:
        return s.exec(select(Adapter).where(Adapter.name == name)).first()


def mark_rejected(engine: Engine, name: str, reason: str | None = None) -> None:
    """Never promotable again; why, when there is a reason beyond the gate's stored decision."""
    with session(engine) as s:
        a = s.exec(select(Adapter).where(Adapter.name == name)).one()
        a.status = "rejected"
        if reason:
            a.metrics = {**(a.metrics or {}), "rejected_because": reason}
        s.add(a)


def list_all(engine: Engine) -> list[Adapter]:
    with session(engine) as s:
        return list(s.exec(select(Adapter).order_by(Adapter.id)).all())


def _live(engine: Engine) -> list[Deployment]:
    with session(engine) as s:
        return list(s.exec(select(Deployment).where(Deployment.rolled_back == False).order_by(Deployment.id.desc())).all())  # noqa: E712


def active(engine: Engine) -> str | None:
    """Name of the serving adapter, or None when the base model serves."""
    return next((d.adapter for d in _live(engine)[:1]), None)


def previous(engine: Engine) -> str | None:
    """The version a rollback returns to (None: the base model)."""
    return next((d.adapter for d in _live(engine)[1:2]), None)


def resident(engine: Engine) -> list[str]:
    """The versions vLLM keeps loaded: the active one, then the one a rollback returns to. A full fine-tune
    that stopped serving is not kept: its own vLLM server is stopped, and a rollback to it starts one again
    (blue-green, as its promotion did)."""
    names = [d.adapter for d in _live(engine)[:2]]
    full = len(names) == 2 and names[1] is not None and getattr(find(engine, names[1]), "kind", "") == "full"
    return names[:1] if full else names


# ---- promotion against vLLM (serve/residency.py unloads what drops out, in the background) ----

def loaded(client: VLLMClient, row: Adapter) -> bool:
    for m in client.models():
        if m["id"] == row.name:
            if m.get("root") not in (None, row.path):  # another store's version under this name: never score that one
                raise AdapterError(f"vLLM already serves {row.name!r} from {m['root']}, not {row.path}; "
                                   "two stores share this vLLM server and reuse version names: give each its own server")
            return True
    return False


def ensure_loaded(client: VLLMClient, row: Adapter) -> None:
    if not loaded(client, row):
        _load(client, row)


def _load(client: VLLMClient, row: Adapter) -> None:
    """Into vLLM: a LoRA at run time; a full fine-tune by starting its own server (serve/fleet.py)."""
    if row.kind == "full" and not client.blue_green:
        raise AdapterError(f"{row.name!r} is a full fine-tune, served by a vLLM of its own that only TUNELOOP_VLLM_MODE=spawn starts")
    client.load_adapter(row.name, row.path)


def bring_up(client: VLLMClient, row: Adapter, settings: Settings) -> None:
    """Validate the files again; a version vLLM does not hold yet is loaded and probed (on failure vLLM
    is left as it was). One already loaded (a cycle's candidate, the previous version) costs no request
    to the model: that is what makes promotion and rollback one step."""
    validate(Path(row.path), settings, row.base_model, digest=False)  # the directory could have been tampered with
    if loaded(client, row):
        return
    _load(client, row)
    try:
        client.chat({"model": row.name, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1, "temperature": 0})
    except Exception:
        with suppress(VLLMError):
            client.unload_adapter(row.name)
        raise


def promote(engine: Engine, client: VLLMClient | None, settings: Settings, name: str) -> None:
    """Bring the version up (instant when loaded) and flip the active row. With client None (service not
    running) only the database flips; serve loads it at start."""
    row = get(engine, name)
    if row.status == "rejected":
        raise AdapterError(f"adapter {name!r} was rejected; promote another version")
    if active(engine) == name:
        return
    if client is not None:
        bring_up(client, row, settings)
    else:
        validate(Path(row.path), settings, row.base_model, digest=False)
    with session(engine) as s:
        s.add(Deployment(adapter=name))


def rollback(engine: Engine, client: VLLMClient | None, settings: Settings) -> str | None:
    """Re-activate the version that served before the current one; returns it (None: base model)."""
    live = _live(engine)
    if not live:
        with session(engine) as s:
            ever = s.exec(select(func.count()).select_from(Deployment)).one()
        raise AdapterError("nothing to roll back: the base model is serving, "
                           + ("and every promotion has been rolled back already" if ever else "and no version was ever promoted"))
    back_to = previous(engine)
    if back_to is not None and client is not None:
        bring_up(client, get(engine, back_to), settings)
    with session(engine) as s:
        dep = s.get(Deployment, live[0].id)
        dep.rolled_back = True
        s.add(dep)
    return back_to


def reload_active(engine: Engine, client: VLLMClient, settings: Settings) -> str | None:
    """After vLLM (re)starts it has no adapters: load the active one again (residency loads the previous)."""
    name = active(engine)
    if name is not None:
        bring_up(client, get(engine, name), settings)
    return name
