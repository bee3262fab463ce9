"""Screenshots of ``mlflow ui`` on a finished search, in headless Chromium driven by Playwright:
the experiment's idea runs sorted by reward, the top ideas compared side by side (reward,
knobs, mode, lineage) and the best idea's ``edit.diff.txt`` artifact.

Needs Debian's ``chromium`` and the ``playwright`` package (its Python API only; no browser
download: it drives /usr/bin/chromium), for example in a side environment:

    python3 -m venv /tmp/pw && /tmp/pw/bin/pip install playwright
    /tmp/pw/bin/python scripts/mlflow_screenshots.py runs/research/search-nanogpt docs/images

The MLflow server and the run lookup use the project's environment (``--venv``, default .venv).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

LOOKUP = """
import json, sys
from mlflow.tracking import MlflowClient
from selftaught.research_record import tracking_uri
c = MlflowClient(tracking_uri=tracking_uri(sys.argv[1]))
e = c.get_experiment_by_name("research-search")
top = c.search_runs([e.experiment_id], "tags.kind = 'idea' and params.status = 'ok'",
                    order_by=["metrics.reward DESC"], max_results=6)
print(json.dumps({"eid": e.experiment_id, "rid": top[0].info.run_id, "name": top[0].info.run_name,
                  "top": [r.info.run_id for r in top]}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("out", nargs="?", default="docs/images")
    ap.add_argument("--venv", default=".venv")
    ap.add_argument("--port", type=int, default=5057)
    args = ap.parse_args()
    run_dir, out = Path(args.run_dir).resolve(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    py, mlflow = Path(args.venv) / "bin" / "python", Path(args.venv) / "bin" / "mlflow"
    found = json.loads(subprocess.run([str(py), "-c", LOOKUP, str(run_dir)], check=True, capture_output=True,
                                      text=True).stdout)
    # litellm (imported by the server's job registry) would try to fetch its price map and,
    # offline, deadlock on its import lock: keep it on the bundled map
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    ui = subprocess.Popen([str(mlflow), "ui", "--backend-store-uri", f"sqlite:///{run_dir}/mlflow.db",
                           "--host", "127.0.0.1", "--port", str(args.port)], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{args.port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"])
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            query = urllib.parse.urlencode({"searchFilter": "tags.kind = 'idea'", "orderByKey": "metrics.`reward`",
                                            "orderByAsc": "false"}, quote_via=urllib.parse.quote)
            page.goto(f"{base}/#/experiments/{found['eid']}/runs?{query}")
            page.wait_for_selector("text=idea-", timeout=60_000)
            if page.get_by_role("button", name="Model training").count():
                page.get_by_role("button", name="Model training").first.click()
            close = page.get_by_role("button", name="Close", exact=True)  # the assistant side panel
            if close.count():
                close.first.click()
            page.wait_for_timeout(1500)
            page.screenshot(path=str(out / "mlflow-idea-runs.png"))
            # the ideas side by side: MLflow's run comparison of the top ideas (reward, knobs, lineage)
            runs = urllib.parse.quote(json.dumps(found["top"]))
            page.goto(f"{base}/#/compare-runs?runs={runs}&experiments={urllib.parse.quote(json.dumps([found['eid']]))}")
            page.wait_for_selector("text=reward", timeout=60_000)
            page.wait_for_timeout(2500)
            page.set_viewport_size({"width": 1600, "height": 2200})  # the params and metrics tables below the plot
            page.wait_for_timeout(1500)
            page.screenshot(path=str(out / "mlflow-ideas.png"))
            page.set_viewport_size({"width": 1600, "height": 1000})
            page.goto(f"{base}/#/experiments/{found['eid']}/runs/{found['rid']}/artifacts/edit.diff.txt")
            page.wait_for_selector("text=edit.diff.txt", timeout=60_000)
            page.wait_for_timeout(2500)
            page.screenshot(path=str(out / "mlflow-idea-artifacts.png"))
            browser.close()
    finally:
        ui.terminate()
        ui.wait(timeout=30)
    print(json.dumps({**found, "shots": [str(out / n) for n in ("mlflow-idea-runs.png", "mlflow-ideas.png",
                                                                 "mlflow-idea-artifacts.png")]}))


if __name__ == "__main__":
    main()
