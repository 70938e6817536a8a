"""The canary tab of the curation page: the running canary's arms and last check, each version's live
thumbs-up rate over time with its 95% interval, how recent canaries ended, and stop / complete."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from data_store.errors import Refused
from serve import canary
from serve.services import Services

RATE_COLUMNS = ["version", "thumbs-up rate", "95% interval", "rated"]


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def build(services: Services, demo: gr.Blocks) -> None:
    engine = services.engine

    def state() -> str:
        lines = canary.describe(engine)
        if canary.running(engine) is None:
            lines.insert(1, f"With `TUNELOOP_CANARY_SHARE` above 0 (now {services.settings.canary_share:g}), a version the gate "
                            "passes first serves that share of new conversations.")
        return "\n".join(f"- {line.strip()}" for line in lines)

    def rates():
        table = [[v["version"] or "base model", _pct(v["rate"]), f"{_pct(v['interval'][0])} to {_pct(v['interval'][1])}", v["rated"]]
                 for v in canary.version_rates(engine)]
        points = [{"time": p["time"], "rate": p[k], "series": f"{p['version'] or 'base model'} {label}"}
                  for p in canary.rate_over_time(engine) for k, label in (("rate", "rate"), ("low", "95% low"), ("high", "95% high"))]
        plot = pd.DataFrame(points) if points else pd.DataFrame({"time": [pd.Timestamp.now(tz="UTC")], "rate": [0.0], "series": ["none"]})
        return table or [[""] * len(RATE_COLUMNS)], plot

    def refresh():
        return state(), *rates()

    def end(how: str, request: gr.Request):
        try:
            c = services.end_canary(how, services.auth.curator(request) or "open")
        except Refused as e:  # an answer, not a failure: said in the message line, the rest left as it was
            return state(), *rates(), f"**Refused:** {e}"
        return state(), *rates(), f"Canary {c.id} {c.status}."

    with gr.Row():
        refresh_btn = gr.Button("Refresh", elem_id="canary-refresh")
        complete = gr.Button("Complete canary (promote it)", variant="primary", elem_id="canary-complete")
        stop = gr.Button("Stop canary", variant="stop", elem_id="canary-stop")
    message = gr.Markdown(elem_id="canary-message")
    status = gr.Markdown(elem_id="canary-state")
    live = gr.Dataframe(headers=RATE_COLUMNS, interactive=False, elem_id="live-rates", label="Live thumbs-up rate per version")
    plot = gr.LinePlot(x="time", y="rate", color="series", title="Thumbs-up rate over time (cumulative, with 95% interval)",
                       elem_id="rate-plot", y_lim=[0, 1])
    refresh_btn.click(refresh, None, [status, live, plot])
    def on_complete(request: gr.Request):
        return end("complete", request)

    def on_stop(request: gr.Request):
        return end("stop", request)

    complete.click(on_complete, None, [status, live, plot, message])
    stop.click(on_stop, None, [status, live, plot, message])
    demo.load(refresh, None, [status, live, plot])
