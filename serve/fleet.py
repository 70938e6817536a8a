"""Full fine-tunes, served blue-green: a vLLM server of their own beside the spawned one.

A fully fine-tuned model cannot be loaded into vLLM as a LoRA. So "loading" a full version starts a
second vLLM on its weights (no LoRA, so vLLM compiles it as it compiles any plain model), waits for
health and warms it; "unloading" it stops that server. Everything above this module is unchanged:
the cycle loads a candidate to judge it, residency (serve/residency.py) flips the active version in
one step and drains and unloads the old one in the background, and each request goes to the server
that serves the model it names. So a promotion is: start green (the cycle already did, to judge it),
flip, drain blue, stop blue. A rollback to a full version starts its server again the same way.

The spawned server keeps the base model and every LoRA version. LoRA versions are always adapters of
the base model, never of a full fine-tune (a non-goal for now).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_store.errors import Refused
from serve.adapters import is_full
from serve.client import VLLMClient
from serve.vllm_server import VLLMSupervisor, has_gpu
from settings import Settings

log = logging.getLogger(__name__)
GIB = 1 << 30
# One vLLM CPU server beside its weights and KV cache: the Python process, torch, the engine core and its
# compiled graphs. Measured for the default model here (its processes' RSS less weights and cache): about 3 GiB.
SERVER_RUNTIME_GIB = 3.0
# A start that hangs: seen once in about ten starts here, the front end never started its engine (no log line
# after its config). A normal start never went quiet for more than about 50 s (compiling), so 150 s of silence
# means hung: that server is stopped and one more is started.
STALL_S = 150


class BlueGreenError(Refused):
    """507: a full version's server cannot be started (memory, or it failed to come up)."""

    status = 507


@dataclass(frozen=True)
class Need:
    weights: int
    kv_cache: int
    runtime: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.runtime


def need(settings: Settings, model_dir: Path) -> Need:
    """What one more CPU server for this model takes."""
    weights = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
    return Need(weights, settings.vllm_cpu_kvcache_gb * GIB, int(SERVER_RUNTIME_GIB * GIB))


def fits(n: Need, available: int) -> str | None:
    """None when it fits; otherwise why not, with what to change."""
    if n.total <= available:
        return None
    return (f"a second vLLM server needs about {n.total / GIB:.1f} GiB (weights {n.weights / GIB:.1f}, KV cache "
            f"{n.kv_cache / GIB:.0f} from TUNELOOP_VLLM_CPU_KVCACHE_GB, runtime {n.runtime / GIB:.1f}), and this machine has "
            f"{available / GIB:.1f} GiB available; free memory, lower TUNELOOP_VLLM_CPU_KVCACHE_GB, or train LoRA versions "
            "(TUNELOOP_TRAIN__METHOD=lora), which share the one server")


def available_memory() -> int:
    """MemAvailable from /proc/meminfo: what can be allocated without swapping."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def cpu_binding(settings: Settings, taken: set[str]) -> dict[str, str]:
    """On CPU, a full version's server computes on other cores than the servers already running: by default
    the last core not taken by another full version's server, counting down (the first gets the last core,
    which the spawned server leaves to its front end; a second, started while the first serves during a
    full-to-full swap, the one before). Two servers on one core starve each other: measured on 2 cores, one
    server's 24-token answers took 42 s instead of 0.7 s."""
    if has_gpu():
        return {}
    if settings.vllm_second_server_cpus:
        return {"VLLM_CPU_OMP_THREADS_BIND": settings.vllm_second_server_cpus}
    cores = [str(c) for c in sorted(os.sched_getaffinity(0), reverse=True)]
    return {"VLLM_CPU_OMP_THREADS_BIND": next((c for c in cores if c not in taken), cores[0])}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Fleet:
    """The spawned vLLM (base model and LoRA versions) and a server per full version that must serve, behind
    the one client interface: requests go to the server of the model they name."""

    blue_green = True

    def __init__(self, settings: Settings, primary: VLLMClient):
        self.settings, self.primary, self.url = settings, primary, primary.url
        self._servers: dict[str, tuple[VLLMSupervisor, VLLMClient, str]] = {}  # name -> (its server, client, model dir)
        self._lock = threading.Lock()
        self._starting = threading.Lock()  # one start at a time: two callers bringing up one version start one server
        self._coming: dict[str, VLLMSupervisor] = {}  # a server being started or warmed, not serving yet (health lists it)

    def _for(self, model: str | None) -> VLLMClient:
        with self._lock:
            served = self._servers.get(model or "")
        return served[1] if served else self.primary

    # ---- requests, each to its model's server ----
    def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._for(body.get("model")).chat(body)

    def chat_stream(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        return self._for(body.get("model")).chat_stream(body)

    def completions(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._for(body.get("model")).completions(body)

    def healthy(self) -> bool:
        return self.primary.healthy()

    def models(self) -> list[dict[str, Any]]:
        """The spawned server's models, then each full version's, as its server answers: one restarting (its
        supervisor brings it back) is left out, so the others' versions stay usable meanwhile."""
        with self._lock:
            servers = list(self._servers.values())
        held = self.primary.models()
        for _, client, _ in servers:
            try:
                held += client.models()
            except Exception as e:  # noqa: BLE001 - unreachable or erroring: its version is not held now
                log.warning("a full version's vLLM at %s did not list its models: %s", client.url, e)
        return held

    # ---- versions: LoRA into the spawned server; a full one gets a server of its own ----
    def load_adapter(self, name: str, path: str) -> None:
        if is_full(Path(path)):
            self.start(name, path)
        else:
            self.primary.load_adapter(name, path)

    def unload_adapter(self, name: str) -> None:
        """For a full version, stop its server (residency calls this only once its answers have drained)."""
        with self._lock:
            served = self._servers.pop(name, None)
        if served is None:
            self.primary.unload_adapter(name)
            return
        sup, client, _ = served
        sup.stop()
        client.close()
        log.info("stopped %s's vLLM server", name)

    def servers(self) -> dict[str, str]:
        """Each full version served now, with its server's URL."""
        with self._lock:
            return {name: client.url for name, (_, client, _) in self._servers.items()}

    def states(self) -> dict[str, dict[str, Any]]:
        """For /api/health: each full version's server, its state and restarts, and whether it serves yet. One being
        started or warmed (a cycle's candidate, a promotion from cold) is listed, but serves no one yet."""
        with self._lock:
            coming = {name: {"url": sup.url, "state": "warming" if sup.state == "ready" else "starting",
                             "restarts": sup.restarts, "serving": False} for name, sup in self._coming.items()}
            return coming | {name: {"url": c.url, "state": sup.state, "restarts": sup.restarts, "serving": True}
                             for name, (sup, c, _) in self._servers.items()}

    def check_room(self, name: str, model_dir: str) -> None:
        """Refuse, with the numbers, a second server that would not fit in memory (the cycle asks before it trains
        a full fine-tune, with the base model's size; a start asks again). On a GPU, vLLM sizes itself by
        --gpu-memory-utilization and refuses on its own."""
        if not has_gpu() and (why := fits(need(self.settings, Path(model_dir)), available_memory())) is not None:
            raise BlueGreenError(f"cannot serve full fine-tune {name!r}: {why}")

    def start(self, name: str, path: str) -> None:
        """Start, wait for health, warm. Refused before anything starts when it would not fit in memory."""
        with self._starting:
            with self._lock:
                if name in self._servers:
                    return
            try:
                self._start(name, path)
            finally:
                with self._lock:
                    self._coming.pop(name, None)

    def _start(self, name: str, path: str) -> None:
        self.check_room(name, path)
        settings = self.settings.model_copy(update={"vllm_port": _free_port()})
        for attempt in (1, 2):
            with self._lock:
                taken = {sup.env.get("VLLM_CPU_OMP_THREADS_BIND", "") for sup, _, _ in self._servers.values()}
            sup = VLLMSupervisor(settings, path, name, lora=False, log_name=f"vllm-{name}.log", env=cpu_binding(self.settings, taken))
            with self._lock:
                self._coming[name] = sup
            log.info("starting %s's vLLM server on %s (blue-green)", name, sup.url)
            try:
                sup.start(stall_s=STALL_S)
                break
            except Exception as e:
                sup.stop()
                if attempt == 2 or "wrote nothing" not in str(e):
                    raise BlueGreenError(f"{name!r}'s vLLM server did not come up: {e}", 502) from e
                log.warning("%s; starting it again", e)
        client = VLLMClient(sup.url)
        try:  # warm: the first answers of a fresh server are slow; no user's should be
            for _ in range(2):
                client.chat({"model": name, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 8, "temperature": 0})
        except Exception as e:
            sup.stop()
            client.close()
            raise BlueGreenError(f"{name!r}'s vLLM server came up but did not answer: {e}", 502) from e
        with self._lock:
            self._servers[name] = (sup, client, path)  # start() drops it from _coming; states() prefers this entry

    def close(self) -> None:
        """At shutdown: stop every full version's server (the spawned one is its supervisor's)."""
        for name in list(self.servers()):
            self.unload_adapter(name)
        with self._lock:
            coming = list(self._coming.values())
        for sup in coming:  # one still starting: its start then fails, and nothing is left running
            sup.stop()
        self.primary.close()

