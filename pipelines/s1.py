"""s1 end to end: curate reasoning traces, fine-tune, and measure test-time scaling.

pool (reasoning-gym arithmetic tasks with step-by-step traces, plus any Parquet of
question/trace/answer) -> curation (quality, difficulty by a reference model on engine actors,
domain-uniform length-weighted selection) -> SFT (Ray Train, loss on reasoning and answer) ->
evaluation with budget forcing on engine actors through Ray Data, every setting of one family
in the same batches -> table, JSON and plot.

The curve has two halves, both measured in generated tokens per question:

- sequential scaling: the same greedy model with its thinking capped at several budgets
  (the delimiter forced at the cap), at its natural length, and pushed past its natural end by
  1, 2, 4 ... "Wait" extensions;
- parallel scaling: k sampled answers per question and a majority vote, for the k in
  ``eval.votes``; its cost is the tokens of all k samples.

Every stage is resumable (a finished stage is skipped; evaluation writes one part per family).
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from pipelines.curation import CurationConfig, EngineSolver, curate, load_pool, write_curation
from pipelines.stages import model_dir, train_stage
from selftaught.config import BudgetConfig, EngineConfig, RayConfig, SamplingConfig, Strict, save
from selftaught.storage import RunDir, Stage, file_fingerprint, read_parquet, write_parquet
from trainers.config import TrainConfig

log = logging.getLogger(__name__)

DEFAULT_TASK_CONFIG = {
    "chain_sum": {"min_terms": 2, "max_terms": 6, "min_digits": 1, "max_digits": 2},
    "basic_arithmetic": {"min_terms": 2, "max_terms": 4, "min_digits": 1, "max_digits": 1,
                         "operators": ["+", "-", "*"]},
    "products": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1},
}


class PoolConfig(Strict):
    tasks: list[str] = list(DEFAULT_TASK_CONFIG)
    task_config: dict[str, dict[str, Any]] = DEFAULT_TASK_CONFIG
    size_per_task: int = Field(default=300, ge=1)
    seed: int = 1
    parquet: str | None = None  # more rows: any Parquet with question / trace / answer (/ task)
    columns: dict[str, str] = Field(default_factory=dict)  # our name -> the file's column name


class ReferenceConfig(Strict):
    """The reference model whose successes mark a question as too easy (s1 used two strong
    models; here the base model before fine-tuning, answering directly)."""

    engine: EngineConfig = EngineConfig(backend="transformers", max_batch_size=64)
    sampling: SamplingConfig = SamplingConfig(temperature=0.0, max_new_tokens=16)


class SFTConfig(Strict):
    train: TrainConfig = TrainConfig(lr=1e-4, schedule="cosine", warmup_frac=0.05, weight_decay=1e-4,
                                     seq_len=256, micro_batch_size=8, eval_every=1000, log_every=5)
    epochs: float = Field(default=4.0, gt=0)  # sets train.token_budget from the selected set


class EvalConfig(Strict):
    size_per_task: int = Field(default=20, ge=1)
    # reasoning-gym draws item i from Random(seed + i): the held-out seed range must not meet the
    # pool's (checked), and questions equal to a pool question are dropped as well
    seed: int = 1_000_000
    caps: list[int] = [0, 4, 8, 16, 32]  # max_thinking_tokens, sequential scaling by truncation
    extensions: list[int] = [1, 2, 4]  # "Wait" extensions past the natural end
    votes: list[int] = [1, 2, 4, 8]  # majority voting over k samples, parallel scaling
    vote_temperature: float = Field(default=0.7, gt=0)
    max_answer_tokens: int = Field(default=12, ge=1)
    max_new_tokens: int = Field(default=192, ge=8)  # bound on any one completion
    extension: str = "Wait"
    engine: EngineConfig = EngineConfig(backend="transformers", max_batch_size=48)
    seed_sampling: int = 0


class S1Config(Strict):
    pipeline: Literal["s1"] = "s1"
    run_dir: str = "runs/s1"
    ray: RayConfig = RayConfig()
    base_model: str = "smollm2-135m-instruct"
    format: BudgetConfig = BudgetConfig()  # the SFT format's delimiters (think_start / think_end)
    pool: PoolConfig = PoolConfig()
    # one-operation traces ("3 * 4 = 12") are short but sound: the length floor is the difficulty
    # filter's job (min_trace_tokens), not quality's
    curation: CurationConfig = CurationConfig(target_size=300, quality={"min_trace_chars": 5})
    reference: ReferenceConfig = ReferenceConfig()
    sft: SFTConfig = SFTConfig()
    eval: EvalConfig = EvalConfig()


    @model_validator(mode="after")
    def _held_out(self) -> "S1Config":
        p, e = self.pool, self.eval
        if e.seed < p.seed + p.size_per_task and p.seed < e.seed + e.size_per_task:
            raise ValueError(f"eval.seed {e.seed} (+{e.size_per_task}) overlaps pool.seed {p.seed} "
                             f"(+{p.size_per_task}): reasoning-gym item i comes from seed + i, so the "
                             "evaluation would repeat training questions")
        return self


CONFIG = S1Config


# ---------------------------------------------------------------------- pool and curation
def pool_stage(run: RunDir, cfg: S1Config) -> Stage:
    from selftaught.data.reasoning import build_reasoning, reasoning_gym_version
    from selftaught.data.traces import add_traces

    p = cfg.pool
    inputs = {"reasoning_gym": reasoning_gym_version()}
    if p.parquet:
        inputs["parquet"] = file_fingerprint(p.parquet)
    st = run.stage("pool", p, inputs=inputs)
    if not st.up_to_date():
        st.begin(keep_partial=False)
        rows, stats = build_reasoning(p.tasks, p.size_per_task, p.seed, p.task_config)
        traced, dropped = add_traces(rows)
        extra_malformed = 0
        if p.parquet:
            more, extra_malformed = load_pool(p.parquet, p.columns or None)
            traced += more
        write_parquet(traced, st.path / "pool.parquet")
        st.finish(rows=len(traced), generated=stats["kept"], untraced=dropped, parquet_malformed=extra_malformed)
    return st


def _direct_prompt(row: dict) -> str:
    return f"{row['question'].strip()}\nAnswer with the number only."


def curation_stage(run: RunDir, cfg: S1Config, pool: Stage) -> Stage:
    st = run.stage("curation", {"curation": cfg.curation, "reference": cfg.reference, "base": cfg.base_model},
                   deps=[pool])
    if not st.up_to_date():
        st.begin(keep_partial=False)
        rows = read_parquet(pool.path / "pool.parquet").to_pylist()
        engine = cfg.reference.engine.model_copy(update={"model": cfg.base_model})
        solver = EngineSolver(engine, cfg.reference.sampling, prompt=_direct_prompt) if cfg.curation.uses_difficulty else None
        selected, report = curate(rows, cfg.curation, solver)
        write_curation(st.path, selected, report)
        st.finish(selected=len(selected), pool=len(rows))
    return st


# ---------------------------------------------------------------------- SFT
def sft_examples(rows: list[dict], cfg: S1Config, tokenizer) -> tuple[list[np.ndarray], list[np.ndarray], dict]:
    from selftaught.data.traces import sft_conversation
    from trainers.data import tokenize_chat

    convs = [sft_conversation(r, cfg.format) for r in rows]
    return tokenize_chat(tokenizer, convs, cfg.sft.train.seq_len, assistant_prefix=cfg.format.think_start)


def packed_windows(lengths: list[int], window: int) -> int:
    """Windows that greedy packing of whole examples fills (one epoch of an examples source)."""
    windows, fill = 0, window
    for n in lengths:
        if fill + n > window:
            windows, fill = windows + 1, 0
        fill += n
    return windows


def sft_stage(run: RunDir, cfg: S1Config, curation: Stage) -> Stage:
    from selftaught.models import load_tokenizer, resolve_model_path
    from trainers.mixture import TokenSource

    base = resolve_model_path(cfg.base_model)
    tok = load_tokenizer(base)
    rows = read_parquet(curation.path / "selected.parquet").to_pylist()
    ids, masks, skipped = sft_examples(rows, cfg, tok)
    if not ids:
        raise ValueError(f"no SFT example fits seq_len={cfg.sft.train.seq_len} (skipped: {skipped})")
    t = cfg.sft.train
    windows = packed_windows([len(x) for x in ids], t.seq_len + 1)
    steps = max(1, math.ceil(cfg.sft.epochs * windows / (t.micro_batch_size * t.grad_accum * t.num_workers)))
    train = t.model_copy(update={"token_budget": steps * t.tokens_per_step()})
    log.info("sft: %d examples (%s skipped) in %d windows; %.1f epochs = %d steps", len(ids), skipped,
             windows, cfg.sft.epochs, steps)

    def sources() -> list:
        return [TokenSource("s1", ids, masks, kind="examples")]

    st = train_stage(run, "sft", train, base, sources, None, deps=(curation,),
                     extra={"format": cfg.format.model_dump(), "epochs": cfg.sft.epochs})
    return st


# ---------------------------------------------------------------------- evaluation
def eval_questions(cfg: S1Config, pool: Stage) -> tuple[list[dict], int]:
    from selftaught.data.reasoning import build_reasoning

    rows, _ = build_reasoning(cfg.pool.tasks, cfg.eval.size_per_task, cfg.eval.seed, cfg.pool.task_config)
    seen = set(read_parquet(pool.path / "pool.parquet", columns=["question"])["question"].to_pylist())
    held = [r for r in rows if r["question"] not in seen]
    return held, len(rows) - len(held)


def settings(cfg: S1Config) -> dict[str, list[dict[str, Any]]]:
    """Evaluation settings by family: name, budget, sampling. One family runs as one part."""
    e, fmt = cfg.eval, cfg.format
    base = fmt.model_dump(include={"think_start", "think_end"})

    def budget(**kw: Any) -> dict[str, Any]:
        return {**base, "max_answer_tokens": e.max_answer_tokens, **kw}

    greedy = {"temperature": 0.0, "max_new_tokens": e.max_new_tokens}
    fams: dict[str, list[dict[str, Any]]] = {
        "cap": [{"name": f"cap {c}", "family": "cap", "knob": c,
                 "sampling": {**greedy, "budget": budget(max_thinking_tokens=c, extension="")}} for c in e.caps],
        "natural": [{"name": "natural", "family": "natural", "knob": 0,
                     "sampling": {**greedy, "budget": budget(extension="")}}]
        + [{"name": f"wait x{k}", "family": "wait", "knob": k,
            "sampling": {**greedy, "budget": budget(num_extensions=k, extension=e.extension)}} for k in e.extensions],
        "vote": [{"name": "vote", "family": "vote", "knob": max(e.votes),
                  "sampling": {"temperature": e.vote_temperature, "max_new_tokens": e.max_new_tokens,
                               "n": max(e.votes), "budget": budget(extension="")}}],
    }
    return fams


def eval_stage(run: RunDir, cfg: S1Config, sft: Stage, pool: Stage) -> Stage:
    import ray.data

    from actors.generator import generate_dataset

    st = run.stage("eval", cfg.eval, deps=[sft, pool], inputs={"format": cfg.format.model_dump()})
    if st.up_to_date():
        return st
    questions, overlap = eval_questions(cfg, pool)
    if not questions:
        raise ValueError(f"all {overlap} evaluation questions also appear in the pool: choose another eval.seed")
    st.begin(keep_partial=True)
    parts = st.parts()
    engine = cfg.eval.engine.model_copy(update={"model": str(model_dir(sft))})
    for p, (family, runs) in enumerate(settings(cfg).items()):
        if parts.done(p):
            continue
        items = []
        for s in runs:
            for q, row in enumerate(questions):
                sampling = dict(s["sampling"])
                if sampling.get("temperature", 0) > 0:
                    sampling["seed"] = cfg.eval.seed_sampling * 1_000_003 + q
                items.append({"setting": s["name"], "family": s["family"], "knob": s["knob"], "q": q,
                              "prompt": json.dumps([{"role": "user", "content": row["question"]}]),
                              "sampling": json.dumps(sampling)})
        log.info("eval %s: %d requests", family, len(items))
        ds = generate_dataset(ray.data.from_items(items), engine, SamplingConfig(), sampling_column="sampling",
                              chat=True)
        out = ds.select_columns(["setting", "family", "knob", "q", "sample_index", "completion_tokens",
                                 "generated_answer", "generated_reasoning", "generated_budget",
                                 "finish_reason"]).take_all()
        parts.write(p, sorted(out, key=lambda r: (r["setting"], r["q"], r["sample_index"])))
    table = score(cfg, questions, parts.read().to_pylist())
    write_results(st.path, cfg, table, overlap, len(questions))
    st.finish(questions=len(questions), dropped_overlap=overlap, points=len(table))
    return st


def score(cfg: S1Config, questions: list[dict], gens: list[dict]) -> list[dict[str, Any]]:
    """One row per point of the curve: accuracy and mean tokens per question."""
    from selftaught.data.reasoning import extract_answer, score_answer
    from selftaught.data.traces import majority

    by: dict[tuple[str, int], list[dict]] = {}
    for g in gens:
        by.setdefault((g["setting"], g["q"]), []).append(g)
    for v in by.values():
        v.sort(key=lambda g: g["sample_index"])
    points: list[dict[str, Any]] = []
    for family, runs in settings(cfg).items():
        for s in runs:
            ks = cfg.eval.votes if family == "vote" else [1]
            for k in ks:
                correct, tokens, thinking, extensions = [], [], [], []
                for q, row in enumerate(questions):
                    samples = by.get((s["name"], q), [])[:k]
                    if not samples:
                        continue
                    answers = [extract_answer(g["generated_answer"]) for g in samples]
                    final = majority(answers) if k > 1 else answers[0]
                    correct.append(score_answer(row, final, extract=False, binary=True))
                    tokens.append(sum(g["completion_tokens"] for g in samples))
                    used = [json.loads(g["generated_budget"]) for g in samples if g["generated_budget"]]
                    thinking.append(sum(u["thinking_tokens"] for u in used))
                    extensions.append(sum(u["extensions"] for u in used))
                name = f"vote@{k}" if family == "vote" else s["name"]
                points.append({"setting": name, "family": "vote" if family == "vote" else s["family"],
                               "knob": k if family == "vote" else s["knob"], "questions": len(correct),
                               "accuracy": float(np.mean(correct)) if correct else 0.0,
                               "tokens_per_question": float(np.mean(tokens)) if tokens else 0.0,
                               "thinking_tokens_per_question": float(np.mean(thinking)) if thinking else 0.0,
                               "extensions_per_question": float(np.mean(extensions)) if extensions else 0.0})
    return points


def write_results(out: Path, cfg: S1Config, table: list[dict], overlap: int, n: int) -> None:
    (out / "results.json").write_text(json.dumps({"questions": n, "dropped_overlap": overlap, "points": table},
                                                 indent=2))
    lines = [f"# s1 test-time scaling ({n} held-out questions; {overlap} overlapping the pool dropped)", "",
             "| setting | family | accuracy | generated tokens / question | thinking tokens / question |"
             " extensions / question |", "|---|---|---:|---:|---:|---:|"]
    for r in table:
        lines.append(f"| {r['setting']} | {r['family']} | {r['accuracy']:.3f} | {r['tokens_per_question']:.1f} | "
                     f"{r['thinking_tokens_per_question']:.1f} | {r['extensions_per_question']:.2f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot_curve(table, out / "curve.png")


def plot_curve(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    seq = sorted([r for r in table if r["family"] in ("cap", "natural", "wait")], key=lambda r: r["tokens_per_question"])
    vote = sorted([r for r in table if r["family"] == "vote"], key=lambda r: r["tokens_per_question"])
    styles = {"cap": ("o", "tab:blue"), "natural": ("*", "black"), "wait": ("s", "tab:green")}
    ax.plot([r["tokens_per_question"] for r in seq], [r["accuracy"] for r in seq], "-", color="tab:blue", alpha=0.5,
            label="sequential (budget forcing)")
    for r in seq:
        m, c = styles[r["family"]]
        ax.plot(r["tokens_per_question"], r["accuracy"], m, color=c)
        ax.annotate(r["setting"], (r["tokens_per_question"], r["accuracy"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.plot([r["tokens_per_question"] for r in vote], [r["accuracy"] for r in vote], "^--", color="tab:orange",
            label="parallel (majority vote)")
    for r in vote:
        ax.annotate(r["setting"], (r["tokens_per_question"], r["accuracy"]), fontsize=7,
                    xytext=(3, -9), textcoords="offset points")
    ax.set_xscale("symlog", linthresh=8)
    ax.set_xlabel("generated tokens per question")
    ax.set_ylabel("accuracy")
    ax.set_title("Test-time scaling after s1-style SFT")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------- report and driver
def write_report(run: RunDir, cfg: S1Config, st: dict[str, Stage]) -> Path:
    cur = json.loads((st["curation"].path / "report.json").read_text())
    res = (st["eval"].path / "results.md").read_text()
    sft = st["sft"].outputs
    lines = ["# s1 run", "", f"Base model: `{cfg.base_model}`; SFT model: `{model_dir(st['sft'])}`.", "",
             f"Pool: {st['pool'].outputs.get('rows')} traced questions; curation selected "
             f"{st['curation'].outputs.get('selected')} (`curation/report.md`).", "",
             f"SFT: {sft.get('steps', '?')} steps, {sft.get('tokens_seen', '?')} tokens, final train loss "
             f"{sft.get('final_loss', '?')}.", "",
             res.replace("# s1 test-time scaling", "## Test-time scaling"), "",
             "![curve](eval/curve.png)", "",
             "Curation removals: `" + json.dumps(cur.get("removed", {})) + "`"]
    path = run.root / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def run(cfg: S1Config) -> dict:
    from selftaught.runtime import init_ray

    run_dir = RunDir(cfg.run_dir)
    save(cfg, run_dir.root / "config.yaml")
    init_ray(cfg.ray)
    st: dict[str, Stage] = {}
    st["pool"] = pool_stage(run_dir, cfg)
    st["curation"] = curation_stage(run_dir, cfg, st["pool"])
    st["sft"] = sft_stage(run_dir, cfg, st["curation"])
    st["eval"] = eval_stage(run_dir, cfg, st["sft"], st["pool"])
    report = write_report(run_dir, cfg, st)
    results = json.loads((st["eval"].path / "results.json").read_text())
    return {"run_dir": str(run_dir.root), "report": str(report), "curve": str(st["eval"].path / "curve.png"),
            "points": {p["setting"]: round(p["accuracy"], 3) for p in results["points"]}}
