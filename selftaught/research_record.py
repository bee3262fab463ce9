"""Recording a research search: MLflow runs per idea, and the run's ``report.md`` + plot.

MLflow layout: a SQLite tracking store ``<run_dir>/mlflow.db`` with artifacts under
``<run_dir>/mlartifacts``; one experiment per search, one parent run per arm (its metrics are
the per-epoch best-so-far and mean reward), and under it one nested run per executed idea with
params (mode, epoch, knobs, lineage), metrics (reward, the environment's numeric metrics, its
compute and cost) and artifacts (the idea, its diff, its logs). Browse it with::

    mlflow ui --backend-store-uri sqlite:///<run_dir>/mlflow.db

Every write is idempotent by tags (``selftaught.key``), so a resumed search that crashed
between logging an idea and journaling that it did finds the run instead of making a twin.
"""
from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any

_SAFE = re.compile(r"[^A-Za-z0-9_\-. /]")
KEY_TAG = "selftaught.key"
COMPLETE_TAG = "selftaught.complete"  # set last: a run without it was cut short and is written again


def _key(k: str) -> str:
    return _SAFE.sub("_", str(k))[:250] or "_"


def tracking_uri(run_dir: str | Path) -> str:
    """The search's MLflow tracking store (SQLite: MLflow 3 refuses new file stores)."""
    return "sqlite:///" + str((Path(run_dir) / "mlflow.db").resolve())


class MlflowRecorder:
    """One experiment for a search, one parent run per arm, one nested run per idea, written
    with ``mlflow.tracking.MlflowClient`` (no global fluent state, so it is thread-safe to
    keep beside other MLflow users in the same process)."""

    def __init__(self, run_dir: str | Path, experiment: str = "research-search"):
        import logging

        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # table creation notices
        logging.getLogger("alembic").setLevel(logging.WARNING)
        run_dir = Path(run_dir).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        self.uri = tracking_uri(run_dir)
        self.client = MlflowClient(tracking_uri=self.uri)
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(
            experiment, artifact_location=(run_dir / "mlartifacts").as_uri(),
            tags={"mlflow.experimentKind": "custom_model_development"})  # the UI's runs table, not GenAI traces

    def _find(self, key: str) -> str | None:
        """The run written under ``key``; a run a crash left half-written (no ``complete`` tag)
        is deleted so the caller writes it again whole."""
        runs = self.client.search_runs([self.experiment_id], f"tags.`{KEY_TAG}` = '{key}'", max_results=10)
        for r in runs:
            if r.data.tags.get(COMPLETE_TAG) == "1":
                return r.info.run_id
            self.client.delete_run(r.info.run_id)
        return None

    def arm_run(self, arm: str, params: dict[str, Any]) -> str:
        key = f"arm:{arm}"
        rid = self._find(key)
        if rid is None:
            rid = self.client.create_run(self.experiment_id, run_name=arm,
                                         tags={"arm": arm, "kind": "arm", KEY_TAG: key}).info.run_id
            for k, v in params.items():
                self.client.log_param(rid, _key(k), str(v)[:6000])
            self.client.set_tag(rid, COMPLETE_TAG, "1")
        return rid

    def log_epoch(self, parent: str, epoch: int, stats: dict[str, Any]) -> None:
        """The arm's per-epoch figures as step-indexed metrics of its parent run."""
        for k in ("best_so_far", "mean_reward", "executed", "ok", "rejected", "gpu_hours", "cpu_hours", "usd"):
            v = stats.get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self.client.log_metric(parent, k, float(v), step=epoch)

    def log_idea(self, parent: str, arm: str, epoch: int, proposal: dict[str, Any], result: dict[str, Any],
                 cost: dict[str, float]) -> str:
        idea = proposal
        key = f"idea:{arm}:{idea['id']}"
        found = self._find(key)
        if found is not None:
            self.client.set_terminated(found, "FINISHED" if result.get("status") == "ok" else "FAILED")
            return found
        status = result.get("status", "")
        rid = self.client.create_run(self.experiment_id, run_name=idea["id"], tags={
            "mlflow.parentRunId": parent, "arm": arm, "kind": "idea", "status": status, "mode": idea.get("mode", ""),
            KEY_TAG: key}).info.run_id
        params = {"arm": arm, "epoch": epoch, "mode": idea.get("mode", ""), "idea_id": idea["id"],
                  "status": status, "stage": result.get("stage") or "",
                  "shown_ids": ",".join(idea.get("shown_ids") or []), "model": idea.get("model", "")}
        for k, v in (idea.get("knobs") or {}).items():
            params[f"knob.{k}"] = v
        from mlflow.entities import Metric, Param

        # a failed idea has no reward (0.0 would sort it above valid ideas of a negative metric)
        metrics = {"reward": float(result["reward"])} if status == "ok" and result.get("reward") is not None else {}
        for k, v in (result.get("metrics") or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                metrics[f"env.{k}"] = float(v)
        metrics.update({k: float(v or 0.0) for k, v in cost.items()})
        now = int(time.time() * 1000)
        self.client.log_batch(rid, metrics=[Metric(_key(k), v, now, epoch) for k, v in metrics.items()],
                              params=[Param(_key(k), str(v)[:6000]) for k, v in params.items()])
        text = idea.get("text") or ""
        self.client.log_text(rid, json.dumps({"text": text, "knobs": idea.get("knobs"), "mode": idea.get("mode"),
                                              "shown_ids": idea.get("shown_ids"), "thinking": idea.get("thinking")},
                                             indent=1), "idea.json")
        if result.get("edit"):
            self.client.log_text(rid, result["edit"], "edit.diff.txt")
        for stage, log in (result.get("logs") or {}).items():
            self.client.log_text(rid, str(log), f"logs/{_key(stage)}.txt")
        if result.get("error"):
            self.client.log_text(rid, str(result["error"]), "error.txt")
        self.client.set_tag(rid, COMPLETE_TAG, "1")
        self.client.set_terminated(rid, "FINISHED" if status == "ok" else "FAILED")
        return rid

    def finish(self, rid: str) -> None:
        self.client.set_terminated(rid, "FINISHED")


# --------------------------------------------------------------------------- report
def _fmt(x: Any, nd: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}g}"
    return str(x)


def _kinds(kinds: dict[str, int] | None, executed: int) -> str:
    """``hp / alg / unjudged`` counts with the hyper-parameter share of the judged ideas."""
    k = kinds or {}
    hp, alg = k.get("hyperparameter", 0), k.get("algorithmic", 0)
    rest = max(0, executed - hp - alg)
    share = f" ({hp / (hp + alg):.0%} hyper-parameter)" if hp + alg else ""
    return f"{hp} / {alg} / {rest}{share}"


def write_plot(path: Path, epochs: dict[str, list[dict[str, Any]]], baseline: float | None,
               bar: float | None = None) -> Path | None:
    """Best-so-far and mean reward per epoch for every arm, with the baseline and the bar
    (baseline mean + 2 std) as lines."""
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
        if bar is not None and bar != baseline:
            ax.axhline(bar, color="grey", linestyle=":", label="baseline + 2 std")
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
    plot = write_plot(run_dir / "search.png", epochs, baseline, summary.get("bar"))
    L = ["# Execution-guided search", ""]
    L.append(f"Environment `{summary.get('env')}`; N={summary.get('batch_size')} ideas per epoch, "
             f"{summary.get('epochs')} epochs per arm; ideator `{summary.get('ideator')}`.")
    L.append("")
    sd, n, bar = summary.get("baseline_std"), summary.get("baseline_n"), summary.get("bar")
    L.append(f"Baseline (unmodified code): {_fmt(baseline)} ± {_fmt(sd, 2)} over {n} seeds; the bar an idea must "
             f"clear to count as more than seed noise is mean + 2 std = {_fmt(bar)}." if baseline is not None
             else "Baseline: not measured (`selftaught research baseline`); every ok idea counts as positive.")
    stop = summary.get("stopped")
    L.append("")
    if stop and stop.get("cap") == "error":
        L.append(f"**Interrupted** by an error; rerun the same command to resume: {stop['message']}")
    elif stop:
        L.append(f"**Stopped early**: cap `{stop['cap']}` ({stop['message']})")
    else:
        L.append(f"Finished: {summary.get('state', 'complete')}.")
    est = summary.get("estimate")
    if est:
        L.append("")
        judge = f", judge {_fmt(est.get('judge_usd'))}" if est.get("judge_usd") else ""
        L.append(f"Estimated before starting: up to {_fmt(est.get('usd'))} USD (ideator {_fmt(est.get('ideator_usd'))} "
                 f"over at most {est.get('calls')} calls{judge}); remaining under the cap: "
                 f"{_fmt(est.get('remaining_usd'))}.")
    L += ["", "## Arms (equal budget: executed jobs)", "",
          "| arm | executed | ok | completion | best | beat baseline | clear the bar | jobs | GPU-h | CPU-h | ideator USD | "
          "judge USD | rejected by novelty | hyper-parameter / algorithmic / unjudged | still running |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm, t in summary.get("arms", {}).items():
        L.append(f"| {arm} | {t['executed']} | {t['ok']} | {_fmt(t['completion_rate'], 3)} | {_fmt(t['best'])} | "
                 f"{_fmt(t.get('beat_baseline'))} | {_fmt(t.get('clear_bar'))} | "
                 f"{t['jobs']} | {_fmt(t['gpu_hours'], 3)} | {_fmt(t['cpu_hours'], 3)} | {_fmt(t['usd'], 4)} | "
                 f"{_fmt(t.get('judge_usd'), 4)} | {rejected.get(arm, 0)} | {_kinds(t.get('kinds'), t['executed'])} | "
                 f"{t.get('still_running', 0)} |")
    L += ["", "Implementer dollars (free-form ideas) are in the ledger by role, for the whole run: "
          f"{_fmt(((summary.get('ledger') or {}).get('roles') or {}).get('implementer', {}).get('usd'), 4)} USD."]
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


# --------------------------------------------------------------------------- RL report
def write_rl_report(run_dir: str | Path, summary: dict[str, Any], curves: dict[str, list[dict[str, Any]]]) -> Path:
    """``report.md`` and ``rl.png`` of an RL run: mean and max reward per step for each
    objective, diversity, and a table at equal budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for arm, rows in curves.items():
        xs = [r["step"] for r in rows]
        axes[0].plot(xs, [r["mean_reward"] for r in rows], marker="o", label=arm)
        axes[1].plot(xs, [r["max_reward"] for r in rows], marker="o", label=arm)
        axes[2].plot(xs, [r["distinct_frac"] for r in rows], marker="o", label=arm)
    for ax, title in zip(axes, ("mean reward of the group", "max reward of the group", "distinct ideas / group")):
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "rl.png", dpi=100)
    plt.close(fig)
    L = ["# RL on the ideator", "",
         f"Environment `{summary['env']}`, policy `{summary['model']}`; {summary['prompts_per_step']} group(s) of "
         f"{summary['group_size']} ideas per step, {summary['steps']} steps per objective; maximum staleness "
         f"{summary['max_staleness']} (0: on-policy).", "",
         "## Objectives at equal budget", "",
         "| objective | steps | ideas | jobs | CPU-h | GPU-h | mean reward, first -> last steps | "
         "max reward, first -> last steps | best | distinct (last) | weight sync s | step s |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm, a in summary["arms"].items():
        L.append(f"| {arm} | {a['steps']} | {a['ideas']} | {a['jobs']} | {_fmt(a['cpu_hours'], 3)} | "
                 f"{_fmt(a['gpu_hours'], 3)} | {_fmt(a['mean_first'])} -> {_fmt(a['mean_last'])} | "
                 f"{_fmt(a['max_first'])} -> {_fmt(a['max_last'])} | {_fmt(a['best'])} | {_fmt(a['distinct_last'], 3)} | "
                 f"{_fmt(a['sync_s_mean'], 3)} | {_fmt(a['step_s_mean'], 3)} |")
    L += ["", "(first / last: the mean over the first and the last third of the steps, at most 3 each.)", "",
          "![rl](rl.png)", "", "## Per step", "",
          "| objective | step | mean | max | valid | distinct | masked groups | stale | loss | clip | sync s | step s | best idea |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm, rows in curves.items():
        for r in rows:
            best = str(r.get("best_idea", "")).replace("|", "/").replace("\n", " ")[:80]
            L.append(f"| {arm} | {r['step']} | {_fmt(r['mean_reward'])} | {_fmt(r['max_reward'])} | "
                     f"{_fmt(r['valid_frac'], 3)} | {_fmt(r['distinct_frac'], 3)} | {len(r.get('masked_groups') or [])} | "
                     f"{r.get('stale', 0)} | {_fmt(r.get('loss'))} | {_fmt(r.get('clip_frac'), 3)} | "
                     f"{_fmt(r['sync_s'], 3)} | {_fmt(r['step_s'], 3)} | `{best}` |")
    path = run_dir / "report.md"
    path.write_text("\n".join(L) + "\n")
    return path
