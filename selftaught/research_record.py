"""Recording a research search: MLflow runs per idea, and the run's ``report.md`` + plot.

MLflow layout (a local file store under ``<run_dir>/mlruns``): one experiment per search, one
parent run per arm, and under it one nested run per executed idea with params (mode, epoch,
knobs, lineage), metrics (reward and the environment's numeric metrics) and artifacts (the
idea text, its diff, its logs).

When the ``mlflow`` package is importable its client writes the store. Without it, the same
file-store layout is written directly (``meta.yaml``, ``params/``, ``metrics/``, ``tags/``,
``artifacts/``), which ``mlflow ui --backend-store-uri <run_dir>/mlruns`` reads later.
"""
from __future__ import annotations

import json
import math
import re
import time
import uuid
from pathlib import Path
from typing import Any

_SAFE = re.compile(r"[^A-Za-z0-9_\-. /]")


def _key(k: str) -> str:
    return _SAFE.sub("_", str(k))[:250] or "_"


def have_mlflow() -> bool:
    try:
        import mlflow  # noqa: F401
    except ImportError:
        return False
    return True


class _FileStore:
    """The subset of MLflow's file store that the search writes (no mlflow dependency)."""

    def __init__(self, root: Path):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def experiment(self, name: str) -> str:
        for meta in self.root.glob("*/meta.yaml"):
            if f"name: {name}\n" in meta.read_text():
                return meta.parent.name
        ids = [int(p.name) for p in self.root.iterdir() if p.is_dir() and p.name.isdigit()]
        eid = str(max(ids, default=0) + 1)
        d = self.root / eid
        d.mkdir()
        now = int(time.time() * 1000)
        (d / "meta.yaml").write_text(
            f"artifact_location: {d.resolve().as_uri()}\ncreation_time: {now}\nexperiment_id: '{eid}'\n"
            f"last_update_time: {now}\nlifecycle_stage: active\nname: {name}\n")
        return eid

    def create_run(self, eid: str, name: str, tags: dict[str, str]) -> str:
        rid = uuid.uuid4().hex
        d = self.root / eid / rid
        for sub in ("params", "metrics", "tags", "artifacts"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        now = int(time.time() * 1000)
        (d / "meta.yaml").write_text(
            f"artifact_uri: {(d / 'artifacts').resolve().as_uri()}\nend_time: null\nentry_point_name: ''\n"
            f"experiment_id: '{eid}'\nlifecycle_stage: active\nrun_id: {rid}\nrun_name: {name}\n"
            f"run_uuid: {rid}\nsource_name: ''\nsource_type: 4\nsource_version: ''\nstart_time: {now}\n"
            f"status: 1\ntags: []\nuser_id: selftaught\n")
        for k, v in {**tags, "mlflow.runName": name}.items():
            (d / "tags" / _key(k)).write_text(str(v))
        return rid

    def _dir(self, rid: str) -> Path:
        return next(self.root.glob(f"*/{rid}"))

    def log_param(self, rid: str, k: str, v: Any) -> None:
        (self._dir(rid) / "params" / _key(k)).write_text(str(v)[:6000])

    def log_metric(self, rid: str, k: str, v: float, step: int = 0) -> None:
        with open(self._dir(rid) / "metrics" / _key(k), "a") as f:
            f.write(f"{int(time.time() * 1000)} {float(v)} {step}\n")

    def log_text(self, rid: str, text: str, name: str) -> None:
        p = self._dir(rid) / "artifacts" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)

    def finish(self, rid: str, status: str = "FINISHED") -> None:
        meta = self._dir(rid) / "meta.yaml"
        code = {"FINISHED": 3, "FAILED": 4, "KILLED": 5}.get(status, 3)
        text = meta.read_text().replace("status: 1\n", f"status: {code}\n")
        meta.write_text(text.replace("end_time: null", f"end_time: {int(time.time() * 1000)}"))


class _MlflowStore:
    """The same calls through ``mlflow.tracking.MlflowClient`` (no global fluent state)."""

    def __init__(self, root: Path):
        from mlflow.tracking import MlflowClient

        root.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=root.resolve().as_uri())

    def experiment(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        return exp.experiment_id if exp else self.client.create_experiment(name)

    def create_run(self, eid: str, name: str, tags: dict[str, str]) -> str:
        return self.client.create_run(eid, tags=tags, run_name=name).info.run_id

    def log_param(self, rid: str, k: str, v: Any) -> None:
        self.client.log_param(rid, _key(k), str(v)[:6000])

    def log_metric(self, rid: str, k: str, v: float, step: int = 0) -> None:
        self.client.log_metric(rid, _key(k), float(v), step=step)

    def log_text(self, rid: str, text: str, name: str) -> None:
        self.client.log_text(rid, text, name)

    def finish(self, rid: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(rid, status)


class MlflowRecorder:
    """One experiment for a search, one parent run per arm, one nested run per idea."""

    def __init__(self, run_dir: str | Path, experiment: str = "research-search", use_mlflow: bool | None = None):
        self.root = Path(run_dir) / "mlruns"
        use = have_mlflow() if use_mlflow is None else use_mlflow
        self.backend = "mlflow" if use else "file-store"
        self.store = _MlflowStore(self.root) if use else _FileStore(self.root)
        self.experiment_id = self.store.experiment(experiment)

    def arm_run(self, arm: str, params: dict[str, Any]) -> str:
        rid = self.store.create_run(self.experiment_id, arm, {"arm": arm})
        for k, v in params.items():
            self.store.log_param(rid, k, v)
        return rid

    def log_idea(self, parent: str, arm: str, epoch: int, proposal: dict[str, Any], result: dict[str, Any],
                 cost: dict[str, float]) -> str:
        idea = proposal
        rid = self.store.create_run(self.experiment_id, idea["id"],
                                    {"mlflow.parentRunId": parent, "arm": arm, "status": result.get("status", "")})
        params = {"arm": arm, "epoch": epoch, "mode": idea.get("mode", ""), "idea_id": idea["id"],
                  "status": result.get("status", ""), "stage": result.get("stage") or "",
                  "shown_ids": ",".join(idea.get("shown_ids") or []), "model": idea.get("model", "")}
        for k, v in (idea.get("knobs") or {}).items():
            params[f"knob.{k}"] = v
        for k, v in params.items():
            self.store.log_param(rid, k, v)
        self.store.log_metric(rid, "reward", float(result.get("reward") or 0.0), step=epoch)
        for k, v in (result.get("metrics") or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self.store.log_metric(rid, f"env.{k}", v, step=epoch)
        for k, v in cost.items():
            self.store.log_metric(rid, k, float(v or 0.0), step=epoch)
        text = idea.get("text") or ""
        self.store.log_text(rid, json.dumps({"text": text, "knobs": idea.get("knobs"), "mode": idea.get("mode"),
                                             "shown_ids": idea.get("shown_ids"), "thinking": idea.get("thinking")},
                                            indent=1), "idea.json")
        if result.get("edit"):
            self.store.log_text(rid, result["edit"], "edit.diff")
        for stage, log in (result.get("logs") or {}).items():
            self.store.log_text(rid, str(log), f"logs/{_key(stage)}.txt")
        if result.get("error"):
            self.store.log_text(rid, str(result["error"]), "error.txt")
        self.store.finish(rid, "FINISHED" if result.get("status") == "ok" else "FAILED")
        return rid

    def finish(self, rid: str) -> None:
        self.store.finish(rid)


# --------------------------------------------------------------------------- report
def _fmt(x: Any, nd: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}g}"
    return str(x)


def write_plot(path: Path, epochs: dict[str, list[dict[str, Any]]], baseline: float | None) -> Path | None:
    """Best-so-far and mean reward per epoch for every arm, with the baseline as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for arm, rows in epochs.items():
        xs = [r["epoch"] for r in rows]
        axes[0].plot(xs, [r.get("best_so_far") for r in rows], marker="o", label=arm)
        axes[1].plot(xs, [r.get("mean_reward") for r in rows], marker="o", label=arm)
    for ax, title in zip(axes, ("best reward so far", "mean reward of ok ideas")):
        if baseline is not None:
            ax.axhline(baseline, color="grey", linestyle="--", label="baseline")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(run_dir: str | Path, summary: dict[str, Any], epochs: dict[str, list[dict[str, Any]]],
                 top: list[dict[str, Any]], rejected: dict[str, int]) -> Path:
    """``report.md`` (and ``search.png``) in the run directory."""
    run_dir = Path(run_dir)
    baseline = summary.get("baseline")
    plot = write_plot(run_dir / "search.png", epochs, baseline)
    L = ["# Execution-guided search", ""]
    L.append(f"Environment `{summary.get('env')}`; N={summary.get('batch_size')} ideas per epoch, "
             f"{summary.get('epochs')} epochs per arm; ideator `{summary.get('ideator')}`.")
    L.append("")
    L.append(f"Baseline (unmodified code): {_fmt(baseline)}" if baseline is not None
             else "Baseline: not measured (`selftaught research baseline`); every ok idea counts as positive.")
    stop = summary.get("stopped")
    L.append("")
    L.append(f"**Stopped early**: cap `{stop['cap']}` ({stop['message']})" if stop
             else f"Finished: {summary.get('state', 'complete')}.")
    est = summary.get("estimate")
    if est:
        L.append("")
        L.append(f"Estimated before starting: up to {_fmt(est.get('usd'))} USD for {est.get('calls')} ideator "
                 f"calls; remaining under the cap: {_fmt(est.get('remaining_usd'))}.")
    L += ["", "## Arms (equal budget: executed jobs)", "",
          "| arm | executed | ok | completion | best | jobs | GPU-h | CPU-h | LLM USD | rejected by novelty |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for arm, t in summary.get("arms", {}).items():
        L.append(f"| {arm} | {t['executed']} | {t['ok']} | {_fmt(t['completion_rate'], 3)} | {_fmt(t['best'])} | "
                 f"{t['jobs']} | {_fmt(t['gpu_hours'], 3)} | {_fmt(t['cpu_hours'], 3)} | {_fmt(t['usd'], 4)} | "
                 f"{rejected.get(arm, 0)} |")
    L += ["", "## Per epoch", "",
          "| arm | epoch | exploit share | exploit/explore/fresh | executed | ok | best so far | mean | "
          "jobs | GPU-h | CPU-h | USD | shortfall |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm, rows in epochs.items():
        for r in rows:
            m = r.get("modes", {})
            L.append(f"| {arm} | {r['epoch']} | {_fmt(r.get('exploit_share'), 3)} | "
                     f"{m.get('exploit', 0)}/{m.get('explore', 0)}/{m.get('fresh', 0)} | {r['executed']} | {r['ok']} | "
                     f"{_fmt(r.get('best_so_far'))} | {_fmt(r.get('mean_reward'))} | {r['jobs']} | "
                     f"{_fmt(r['gpu_hours'], 3)} | {_fmt(r['cpu_hours'], 3)} | {_fmt(r['usd'], 4)} | "
                     f"{r.get('shortfall', 0)} |")
    if plot:
        L += ["", f"![search]({plot.name})"]
    L += ["", "## Top ideas", ""]
    for i, x in enumerate(top, 1):
        desc = x.get("text") or json.dumps(x.get("knobs"), sort_keys=True)
        L.append(f"### {i}. {x['arm']} epoch {x['epoch']} ({x['mode']}): reward {_fmt(x['reward'])}")
        L.append("")
        L.append(f"`{x['idea_id']}`: {desc}")
        if x.get("shown_ids"):
            L.append(f"\nlineage: {', '.join(x['shown_ids'])}")
        if x.get("edit"):
            L += ["", "```diff", x["edit"].rstrip(), "```"]
        L.append("")
    path = run_dir / "report.md"
    path.write_text("\n".join(L) + "\n")
    return path
