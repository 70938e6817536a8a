"""The runs tab of the curation page: retrain now, roll back, and every cycle's data, loss
curves, metrics side by side, and decision with its reasons."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from data_store.errors import Refused
from retrain.runs import get_run, list_runs
from serve import adapters
from serve.services import Services

RUN_COLUMNS = ["id", "status", "adapter", "gate passed", "deployed", "decision or reason", "started"]


def pick(rows: pd.DataFrame, evt: gr.SelectData) -> int | None:
    value = str(rows.iloc[evt.index[0], 0])
    return int(value) if value.isdigit() else None


def build(services: Services, demo: gr.Blocks) -> None:
    engine = services.engine

    def table():
        rows = [[r["id"], r["status"], r["adapter"] or "", "" if r["promoted"] is None else ("yes" if r["promoted"] else "no"),
                 r["deployed"] or "", r["summary"] or r["reason"] or "", r["started_at"][:16]] for r in list_runs(engine)]
        return rows or [[""] * len(RUN_COLUMNS)], f"Serving: **{adapters.active(engine) or 'base model'}**"

    # A refusal (a cycle already running, nothing to roll back) is an answer, not a failure: it goes in the
    # message line, and the table and run details stay as they were (gr.Error would mark every output failed).
    def retrain_now():
        try:
            rid = services.retrain_now()
        except Refused as e:
            return *table(), f"**Refused:** {e}", gr.update()
        rows, serving = table()
        return rows, serving, f"Run {rid} started; press Refresh to follow it.", rid

    def rollback():
        try:
            back = services.rollback()
        except Refused as e:
            return *table(), f"**Refused:** {e}"
        rows, serving = table()
        return rows, serving, f"Rolled back: {back or 'the base model'} serves again."

    def detail(run_id: float | None):
        run = get_run(engine, int(run_id)) if run_id else None
        if run is None:
            return None, None, None, None
        points = [{"step": h["step"], "loss": h[k], "curve": "train" if k == "loss" else "validation"}
                  for h in run["history"] or [] for k in ("loss", "eval_loss") if k in h]
        curves = pd.DataFrame(points or [{"step": 0, "loss": 0.0, "curve": "train"}])
        m = (run["decision"] or {}).get("metrics") or {}
        names = sorted(set(m.get("candidate", {})) | set(m.get("active", {})))
        side = pd.DataFrame([[n, round(m.get("candidate", {}).get(n, float("nan")), 4), round(m.get("active", {}).get(n, float("nan")), 4)]
                             for n in names], columns=["metric", "candidate", "active"]) if names else None
        return run["dataset"], curves, side, {"status": run["status"], "reason": run["reason"], **(run["decision"] or {})}

    with gr.Row():
        serving = gr.Markdown(elem_id="runs-serving")
        refresh = gr.Button("Refresh", elem_id="runs-refresh")
        start = gr.Button("Retrain now", variant="primary", elem_id="retrain-now")
        back = gr.Button("Roll back", variant="stop", elem_id="rollback")
    message = gr.Markdown(elem_id="runs-message")
    runs = gr.Dataframe(headers=RUN_COLUMNS, interactive=False, wrap=True, elem_id="runs")
    run_id = gr.Number(label="Run id", precision=0, elem_id="run-id")
    with gr.Row():
        data = gr.JSON(label="Data used", elem_id="run-data")
        decision = gr.JSON(label="Decision and reasons", elem_id="run-decision")
    curves = gr.LinePlot(x="step", y="loss", color="curve", title="Loss", elem_id="loss-plot")
    metrics = gr.Dataframe(label="Metrics on the frozen test set", interactive=False, elem_id="run-metrics")

    refresh.click(table, None, [runs, serving])
    demo.load(table, None, [runs, serving])
    start.click(retrain_now, None, [runs, serving, message, run_id])
    back.click(rollback, None, [runs, serving, message])
    runs.select(pick, [runs], [run_id])
    run_id.change(detail, [run_id], [data, curves, metrics, decision])
