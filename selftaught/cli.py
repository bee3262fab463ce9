"""The ``selftaught`` command line.

    selftaught run --config examples/sbp/tiny.yaml [--set joint.train.lr=3e-4 ...]
    selftaught sbp --config examples/sbp/tiny.yaml
    selftaught data prepare [--out data] [--set data.wiki_limit=500 ...]
    selftaught generate --model smollm2-135m-instruct --prompt "..." [--chat] [--set sampling.max_new_tokens=64]
    selftaught serve [--config examples/s1/serve.yaml] [--model PATH] [--port 8000] [--set serve.x=...]
    selftaught serve generate --model PATH [--port 8000]
    selftaught models [--size tiny]
    selftaught config show --config X [--set ...]
    selftaught research value -e nanogpt --idea "..." [--knobs '{"lr": 3e-3}'] [--ideas-file F] [-c research.yaml]
    selftaught research baseline -e toy [--seeds 3]
    selftaught research context -e grpo
    selftaught research serve [-c examples/research/serve.yaml]
    selftaught research search -c examples/research/search-toy.yaml [--set batch_size=8 ...] [--plan]
    selftaught research ui runs/research/search-toy [--port 5000]
    selftaught research rl -c examples/research/rl-tiny.yaml

Every command resolves one typed config (file + ``--set`` overrides, unknown keys are errors)
and prints it on request; ``run`` saves it as ``config.yaml`` in the run directory.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from selftaught.logs import offline_env, setup_logging

log = logging.getLogger("selftaught")


def _config_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--config", "-c", required=required, help="YAML config file")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, repeatable (e.g. --set train.lr=3e-4)")


def _pipeline_config(path: str | None, overrides: list[str]):
    from pipelines import get_pipeline
    from selftaught.config import apply_overrides, load_yaml

    data = apply_overrides(load_yaml(path) if path else {}, overrides)
    name = data.get("pipeline")
    if not name:
        raise SystemExit("the config has no 'pipeline:' key (e.g. pipeline: quickstart)")
    cls, fn = get_pipeline(name)
    return _on_storage(cls.model_validate(data)), fn


def _on_storage(cfg):
    """``cfg`` with its run directory placed on the shared storage (see ``resolve_run_dir``)."""
    from selftaught.runtime import resolve_run_dir

    try:
        if getattr(cfg, "run_dir", None):
            cfg = cfg.model_copy(update={"run_dir": resolve_run_dir(cfg.run_dir)})
        ex = getattr(cfg, "executor", None)
        if ex is not None and getattr(ex, "run_dir", None):
            cfg = cfg.model_copy(update={"executor": ex.model_copy(update={"run_dir": resolve_run_dir(ex.run_dir)})})
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    return cfg


def cmd_run(args) -> int:
    cfg, fn = _pipeline_config(args.config, args.overrides)
    setup_logging(cfg.run_dir)
    log.info("pipeline %s -> %s", cfg.pipeline, Path(cfg.run_dir).resolve())
    from pipelines.stages import StoppedEarly

    try:
        result = fn(cfg)
    except StoppedEarly as e:  # a planned early stop (stop_after_steps) is not a failure
        log.warning("%s", e)
        result = {"stopped": e.stage, "steps": e.steps, "total_steps": e.total_steps, "resume": str(e)}
    print(json.dumps(result, indent=2, default=str))
    return 0


def cmd_sbp(args) -> int:
    """``selftaught sbp -c FILE``: the SBP pipeline (default config: examples/sbp/tiny.yaml)."""
    args.config = args.config or str(Path(__file__).resolve().parents[1] / "examples" / "sbp" / "tiny.yaml")
    args.overrides = ["pipeline=sbp", *args.overrides]
    return cmd_run(args)


def cmd_config_show(args) -> int:
    from selftaught.config import to_yaml

    cfg, _ = _pipeline_config(args.config, args.overrides)
    sys.stdout.write(to_yaml(cfg))
    if getattr(cfg, "pipeline", None) == "sbp":  # what the run would need, before it runs
        from pipelines.sbp import plan

        sys.stdout.write("# plan:\n" + "".join(f"#   {k}: {v}\n" for k, v in plan(cfg).items()))
    return 0


class _DataCommand:
    """``data prepare`` takes a bare ``DataConfig`` or the ``data:`` section of a pipeline file."""

    @staticmethod
    def run(args) -> int:
        from selftaught.config import apply_overrides, load_yaml
        from selftaught.data.prepare import DataConfig, prepare

        raw = load_yaml(args.config) if args.config else {}
        raw = raw.get("data", raw) if "pipeline" in raw else raw
        data = apply_overrides({"data": raw}, args.overrides)["data"]
        cfg = DataConfig.model_validate(data)
        setup_logging(args.out)
        stats = prepare(cfg, Path(args.out))
        print(json.dumps(stats, indent=2, default=str))
        return 0


def _engine_and_sampling(args):
    from selftaught.config import EngineConfig, SamplingConfig, apply_overrides

    data = apply_overrides({"engine": {"model": args.model, "backend": args.backend},
                            "sampling": {}}, args.overrides)
    return EngineConfig.model_validate(data["engine"]), SamplingConfig.model_validate(data["sampling"])


def cmd_generate(args) -> int:
    from actors.engine import create_engine

    engine_cfg, sampling = _engine_and_sampling(args)
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += [x for x in Path(args.prompts_file).read_text().splitlines() if x.strip()]
    if not prompts:
        raise SystemExit("give --prompt (repeatable) or --prompts-file")
    engine = create_engine(engine_cfg)
    if args.chat:
        outs = engine.chat([[{"role": "user", "content": p}] for p in prompts], sampling)
    else:
        outs = engine.generate(prompts, sampling)
    for o in outs:
        print(json.dumps({"prompt": prompts[o.request_index],
                          "completions": [c.text for c in o.completions],
                          "finish_reasons": [c.finish_reason for c in o.completions],
                          "completion_tokens": o.metrics.get("completion_tokens")}))
    return 0


def cmd_serve_generate(args) -> int:
    from ray import serve

    from selftaught.config import RayConfig
    from selftaught.runtime import init_ray
    from serve.config import ServeConfig, start_serve
    from serve.generate_app import build_generate_app

    engine_cfg, _ = _engine_and_sampling(args)
    init_ray(RayConfig())
    start_serve(args.host, args.port, args.proxy_location)
    serve.run(build_generate_app(engine_cfg, num_replicas=args.replicas,
                                 serve_cfg=ServeConfig(api_key_env=args.api_key_env)),
              name="generate", route_prefix="/generate")
    log.info("serving %s at http://%s:%d/generate (Ctrl-C to stop)", engine_cfg.model, args.host, args.port)
    return _serve_until_interrupted()


def _serve_until_interrupted() -> int:
    """Keep the driver (and so the Serve apps it started) alive until Ctrl-C."""
    import time

    from ray import serve

    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


def cmd_serve_openai(args) -> int:
    """``selftaught serve``: the OpenAI-compatible app on the embedded (or a running) Ray."""
    from selftaught.config import apply_overrides, load_yaml
    from selftaught.runtime import init_ray
    from serve.config import ServeAppConfig
    from serve.openai_app import base_url, run_openai_app

    data = load_yaml(args.config) if args.config else {}
    flags = []
    if args.model:
        flags.append(f"serve.engine.model={args.model}")
    if args.host:
        flags.append(f"serve.host={args.host}")
    if args.port:
        flags.append(f"serve.port={args.port}")
    cfg = ServeAppConfig.model_validate(apply_overrides(data, [*flags, *args.overrides]))
    cfg.serve.api_keys()  # fail here, not in a replica, when the key variable is empty
    init_ray(cfg.ray)
    run_openai_app(cfg.serve)
    log.info("serving %s at %s (Ctrl-C to stop)", cfg.serve.model_id(), base_url(cfg.serve))
    return _serve_until_interrupted()


def _research_config(args):
    from selftaught.config import apply_overrides, load_yaml
    from envs.codebase import ResearchConfig

    data = load_yaml(args.config) if args.config else {}
    flags = []
    if getattr(args, "env", None):
        flags.append(f"env={args.env}")
    if getattr(args, "env_dir", None):
        flags.append(f"env_dir={args.env_dir}")
    if getattr(args, "spec", None):
        flags.append(f"spec_file={args.spec}")
    cfg = ResearchConfig.model_validate(apply_overrides(data, [*flags, *args.overrides]))
    return _on_storage(cfg)


def _open_env(cfg):
    from envs.codebase import load_dir, load_packaged
    from selftaught.runtime import init_ray

    init_ray(cfg.ray)
    if cfg.env_dir:
        return load_dir(cfg.env_dir, cfg.spec_file, cfg.spec_overrides, cfg.executor)
    return load_packaged(cfg.env, cfg.spec_file, cfg.spec_overrides, cfg.executor)


def _read_ideas(args) -> list:
    ideas: list = list(args.idea or [])
    ideas += [{"knobs": json.loads(k)} for k in args.knobs or []]
    if args.ideas_file:
        text = Path(args.ideas_file).read_text()
        if args.ideas_file.endswith(".jsonl"):
            ideas += [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            ideas += [block.strip() for block in text.split("\n\n") if block.strip()]
    return ideas


def cmd_research_value(args) -> int:
    """Run one batch of ideas end to end and print each result."""
    cfg = _research_config(args)
    ideas = _read_ideas(args)
    if not ideas:
        raise SystemExit("give --idea TEXT, --knobs JSON (repeatable) or --ideas-file FILE")
    env = _open_env(cfg)
    try:
        results = env.value(ideas, timeout_s=args.timeout)
    finally:
        env.close()
    for r in results:
        d = r.to_dict()
        if not args.verbose:
            d = {k: d[k] for k in ("idea_id", "status", "stage", "reward", "error", "metrics", "wall_s")}
            d["edit_lines"] = r.edit.count("\n")
        print(json.dumps(d, default=str))
    ok = sum(r.ok for r in results)
    print(f"# {ok}/{len(results)} ideas executed with a valid result; run directory {env.run_dir}", file=sys.stderr)
    return 0


def cmd_research_baseline(args) -> int:
    cfg = _research_config(args)
    env = _open_env(cfg)
    try:
        rec = env.measure_baseline(seeds=range(args.seeds), timeout_s=args.timeout)
    finally:
        env.close()
    print(json.dumps(rec, indent=2, default=str))
    return 0


def cmd_research_context(args) -> int:
    from envs.codebase import load_dir, load_packaged

    cfg = _research_config(args)
    env = (load_dir(cfg.env_dir, cfg.spec_file, cfg.spec_overrides) if cfg.env_dir
           else load_packaged(cfg.env, cfg.spec_file, cfg.spec_overrides))
    print(env.context())
    return 0


def cmd_research_serve(args) -> int:
    from selftaught.config import apply_overrides, load_yaml
    from selftaught.runtime import init_ray
    from serve.env_app import EnvServeAppConfig, env_base_url, run_env_app

    data = load_yaml(args.config) if args.config else {}
    flags = [f"serve.port={args.port}"] if args.port else []
    cfg = EnvServeAppConfig.model_validate(apply_overrides(data, [*flags, *args.overrides]))
    from serve.auth import keys_from_env

    keys_from_env(cfg.serve.api_key_env)  # fail here, not in a replica, when the key variable is empty
    init_ray(cfg.ray)
    run_env_app(cfg.serve)
    log.info("env.value for %s at %s (Ctrl-C to stop)", [e.name for e in cfg.serve.envs], env_base_url(cfg.serve))
    return _serve_until_interrupted()


def cmd_research_rl(args) -> int:
    """GRPO on the ideator from execution reward (pipelines/research_rl.py)."""
    from selftaught.config import apply_overrides, load_yaml
    from pipelines.research_rl import RLRunConfig, run

    data = load_yaml(args.config) if args.config else {}
    summary = run(RLRunConfig.model_validate(apply_overrides(data, list(args.overrides))))
    for arm, t in summary["arms"].items():
        print(json.dumps({"objective": arm, **t}, default=str))
    print(f"# report: {summary['report']}", file=sys.stderr)
    return 0


def cmd_research_ui(args) -> int:
    """``mlflow ui`` on a search's record (its SQLite store in the run directory)."""
    import shutil

    from selftaught.research_record import tracking_uri

    db = Path(args.run_dir) / "mlflow.db"
    if not db.exists():
        print(f"no MLflow record at {db}: run `selftaught research search` first", file=sys.stderr)
        return 2
    exe = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or shutil.which("mlflow")
    if exe is None:
        print("mlflow is not installed in this environment", file=sys.stderr)
        return 2
    # litellm, imported by the server, must not try to fetch its price map (offline it hangs)
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    argv = [exe, "ui", "--backend-store-uri", tracking_uri(args.run_dir), "--host", args.host, "--port", str(args.port)]
    print("# " + " ".join(argv), file=sys.stderr)
    os.execve(exe, argv, env)
    return 0  # not reached


def cmd_research_search(args) -> int:
    """Evolutionary search vs best-of-N at equal budget (pipelines/research_search.py)."""
    from selftaught.config import apply_overrides, load_yaml
    from pipelines.research_search import SearchConfig, run

    data = load_yaml(args.config) if args.config else {}
    cfg = SearchConfig.model_validate(apply_overrides(data, list(args.overrides)))
    if args.plan:
        from pipelines.research_search import plan

        print(json.dumps(plan(cfg), indent=1, default=str))
        return 0
    summary = run(cfg)
    for arm, t in summary["arms"].items():
        print(json.dumps({"arm": arm, **t}, default=str))
    if summary.get("stopped"):
        print(f"# stopped by cap {summary['stopped']['cap']}: {summary['stopped']['message']}", file=sys.stderr)
    print(f"# report: {summary['report']}", file=sys.stderr)
    return 0


def cmd_models(args) -> int:
    from selftaught.models import MODEL_SIZES, PACKAGED_MODELS

    vocab = args.vocab
    for name, shape in MODEL_SIZES.items():
        if args.size and name != args.size:
            continue
        print(f"{name:6s} layers={shape.layers:3d} hidden={shape.hidden:5d} heads={shape.heads:3d}/"
              f"{shape.kv_heads:<3d} ffn={shape.ffn:6d} context={shape.context:5d} "
              f"params@vocab{vocab}={shape.num_params(vocab) / 1e6:,.1f}M")
    if not args.size:
        print("packaged:", ", ".join(PACKAGED_MODELS))
    return 0


def cmd_submit(args) -> int:
    from selftaught.submit import SubmitOptions, submit

    env = dict(kv.split("=", 1) for kv in args.env or [])
    command = args.command_args[1:] if args.command_args[:1] == ["--"] else args.command_args
    return submit(command, SubmitOptions(address=args.address, working_dir=args.working_dir, storage=args.storage,
                                         env=env, submission_id=args.submission_id, wait=not args.no_wait,
                                         timeout_s=args.timeout))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="selftaught", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a pipeline from a YAML config")
    _config_args(p, required=True)
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("sbp", help="Synthetic Bootstrapped Pretraining (same as run with an sbp config)")
    _config_args(p)
    p.set_defaults(fn=cmd_sbp)

    p = sub.add_parser("submit", help="run a selftaught command as a Ray job on a cluster (after --)")
    p.add_argument("--address", help="the cluster's dashboard, e.g. http://head:8265 (default: $RAY_ADDRESS)")
    p.add_argument("--storage", help="shared run storage every node mounts (default: $SELFTAUGHT_STORAGE)")
    p.add_argument("--working-dir", default=".", help="the code to upload (default: .)")
    p.add_argument("--env", action="append", metavar="NAME=VALUE", help="extra environment variable for the job")
    p.add_argument("--submission-id", help="the job's id (default: Ray's)")
    p.add_argument("--no-wait", action="store_true", help="return once submitted")
    p.add_argument("--timeout", type=float, default=24 * 3600.0, help="seconds to follow the job, then stop it")
    p.add_argument("command_args", nargs=argparse.REMAINDER, help="-- then the selftaught command")
    p.set_defaults(fn=cmd_submit)

    p = sub.add_parser("config", help="inspect configs")
    csub = p.add_subparsers(dest="what", required=True)
    c = csub.add_parser("show", help="print the resolved config")
    _config_args(c, required=True)
    c.set_defaults(fn=cmd_config_show)

    p = sub.add_parser("data", help="bundled datasets")
    dsub = p.add_subparsers(dest="what", required=True)
    d = dsub.add_parser("prepare", help="build the bundled corpora into Parquet")
    _config_args(d)
    d.add_argument("--out", default="data", help="output directory (default: ./data)")
    d.set_defaults(fn=_DataCommand.run)

    def engine_args(q):
        q.add_argument("--model", "-m", default="smollm2-135m-instruct",
                       help="packaged model name or checkpoint directory")
        q.add_argument("--backend", default="auto", choices=["auto", "transformers", "vllm"])
        q.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="engine.* or sampling.* override, repeatable")

    p = sub.add_parser("generate", help="generate text with the engine")
    engine_args(p)
    p.add_argument("--prompt", "-p", action="append", help="prompt, repeatable")
    p.add_argument("--prompts-file", help="one prompt per line")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("serve", help="the OpenAI-compatible Serve app (or: serve generate)")
    _config_args(p)
    p.add_argument("--model", "-m", help="packaged model name or checkpoint (serve.engine.model)")
    p.add_argument("--host", help="bind address (serve.host, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (serve.port, default 8000)")
    p.set_defaults(fn=cmd_serve_openai)
    ssub = p.add_subparsers(dest="what")
    s = ssub.add_parser("generate", help="the engine behind POST /generate")
    engine_args(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--replicas", type=int, default=1)
    s.add_argument("--proxy-location", choices=["EveryNode", "HeadOnly"],  # serve.config.ProxyLocation
                   help="where Serve runs HTTP proxies (default: Serve's, every node with a replica)")
    s.add_argument("--api-key-env", help="NAME of an environment variable holding the accepted API key(s)")
    s.set_defaults(fn=cmd_serve_generate)

    p = sub.add_parser("research", help="execution-grounded research: run ideas as experiments")
    rsub = p.add_subparsers(dest="what", required=True)

    def research_args(q, ideas: bool = False):
        _config_args(q)
        q.add_argument("--env", "-e", help="environment name (nanogpt, grpo, toy) or see --env-dir")
        q.add_argument("--env-dir", help="your own environment directory (env.yaml, codebase/, evaluator)")
        q.add_argument("--spec", help="spec file inside the environment (default env.yaml; paper.yaml: paper shape)")
        q.add_argument("--timeout", type=float, default=None, help="seconds to wait for all results")
        if ideas:
            q.add_argument("--idea", "-i", action="append", help="a free-form idea (repeatable)")
            q.add_argument("--knobs", "-k", action="append", help="a structured idea as JSON (repeatable)")
            q.add_argument("--ideas-file", help=".jsonl of ideas, or text with ideas separated by blank lines")
            q.add_argument("--verbose", "-v", action="store_true", help="print whole results (logs, edit)")

    r = rsub.add_parser("value", help="execute a batch of ideas and print each result")
    research_args(r, ideas=True)
    r.set_defaults(fn=cmd_research_value)
    r = rsub.add_parser("baseline", help="measure the unmodified codebase over seeds (baseline.json)")
    research_args(r)
    r.add_argument("--seeds", type=int, default=3)
    r.set_defaults(fn=cmd_research_baseline)
    r = rsub.add_parser("context", help="print what the ideator sees")
    research_args(r)
    r.set_defaults(fn=cmd_research_context)
    r = rsub.add_parser("serve", help="env.value as an HTTP endpoint on Ray Serve")
    _config_args(r)
    r.add_argument("--port", type=int)
    r.set_defaults(fn=cmd_research_serve)
    r = rsub.add_parser("search", help="evolutionary search vs best-of-N at equal budget (report.md, MLflow)")
    _config_args(r, required=True)
    r.add_argument("--plan", action="store_true",
                   help="print the worst-case jobs, device-hours and LLM dollars per role against the caps; run nothing")
    r.set_defaults(fn=cmd_research_search)

    r = rsub.add_parser("rl", help="GRPO on the ideator from executed rewards, objectives compared at equal budget")
    _config_args(r, required=True)
    r.set_defaults(fn=cmd_research_rl)
    r = rsub.add_parser("ui", help="browse a search's ideas in the MLflow UI (mlflow ui on <run_dir>/mlflow.db)")
    r.add_argument("run_dir")
    r.add_argument("--host", default="127.0.0.1")
    r.add_argument("--port", type=int, default=5000)
    r.set_defaults(fn=cmd_research_ui)

    p = sub.add_parser("models", help="list named model sizes and packaged models")
    p.add_argument("--size")
    p.add_argument("--vocab", type=int, default=32_000)
    p.set_defaults(fn=cmd_models)
    return ap


def main(argv: list[str] | None = None) -> int:
    offline_env()
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        return args.fn(args)
    except (ValueError, KeyError, FileNotFoundError) as e:
        from pydantic import ValidationError

        if isinstance(e, ValidationError):
            print(f"selftaught: invalid configuration:\n{e}", file=sys.stderr)
        else:
            print(f"selftaught: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
