"""The ``selftaught`` command line.

    selftaught run --config examples/sbp/tiny.yaml [--set joint.train.lr=3e-4 ...]
    selftaught sbp --config examples/sbp/tiny.yaml
    selftaught data prepare [--out data] [--set data.wiki_limit=500 ...]
    selftaught generate --model smollm2-135m-instruct --prompt "..." [--chat] [--set sampling.max_new_tokens=64]
    selftaught serve [--config examples/s1/serve.yaml] [--model PATH] [--port 8000] [--set serve.x=...]
    selftaught serve generate --model PATH [--port 8000]
    selftaught models [--size tiny]
    selftaught config show --config X [--set ...]

Every command resolves one typed config (file + ``--set`` overrides, unknown keys are errors)
and prints it on request; ``run`` saves it as ``config.yaml`` in the run directory.
"""
from __future__ import annotations

import argparse
import json
import logging
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
    return cls.model_validate(data), fn


def cmd_run(args) -> int:
    cfg, fn = _pipeline_config(args.config, args.overrides)
    setup_logging(cfg.run_dir)
    log.info("pipeline %s -> %s", cfg.pipeline, Path(cfg.run_dir).resolve())
    result = fn(cfg)
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
    from serve.generate_app import build_generate_app

    engine_cfg, _ = _engine_and_sampling(args)
    init_ray(RayConfig())
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_generate_app(engine_cfg, num_replicas=args.replicas), name="generate",
              route_prefix="/generate")
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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="selftaught", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a pipeline from a YAML config")
    _config_args(p, required=True)
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("sbp", help="Synthetic Bootstrapped Pretraining (same as run with an sbp config)")
    _config_args(p)
    p.set_defaults(fn=cmd_sbp)

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
    s.set_defaults(fn=cmd_serve_generate)

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
