"""The implementer on a tiny codebase with scripted LLM answers (litellm mock_response through the
real client): first-try success, revisions after apply and smoke failures, protected files,
exhausted revisions, LLM outages, parallel chains that stop once one wins."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
import time
from pathlib import Path

import litellm
import pytest

from actors.implementer import Implementation, Implementer, ImplementerConfig, SmokeOutcome
from selftaught.llm import LLMConfig

MAIN = '''import util


def main():
    print("value", util.f(2))


if __name__ == "__main__":
    main()
'''
UTIL = "def f(x):\n    return x + 1\n"

GOOD = '''Double the increment.

```python
util.py
<<<<<<< SEARCH
    return x + 1
=======
    return x + 2
>>>>>>> REPLACE
```
'''
BAD_SEARCH = "util.py\n<<<<<<< SEARCH\n    return x+1\n=======\n    return x + 2\n>>>>>>> REPLACE\n"
SYNTAX_ERROR = "util.py\n<<<<<<< SEARCH\n    return x + 1\n=======\n    return (x + 2\n>>>>>>> REPLACE\n"
PROTECTED = "evaluator.py\n<<<<<<< SEARCH\nSCORE = 0\n=======\nSCORE = 100\n>>>>>>> REPLACE\n"


def llm(**kw) -> LLMConfig:
    return LLMConfig(model="openai/gpt-4o-mini", input_price_per_mtok=1.0, output_price_per_mtok=2.0,
                     max_retries=0, **kw)


@pytest.fixture
def codebase(tmp_path: Path) -> Path:
    d = tmp_path / "codebase"
    d.mkdir()
    (d / "main.py").write_text(MAIN)
    (d / "util.py").write_text(UTIL)
    (d / "evaluator.py").write_text("SCORE = 0\n")
    return d


class Smoke:
    """Runs ``python main.py`` in the copy (imports and one call), counting its runs."""

    def __init__(self, slow_dirs: str | None = None, delay_s: float = 0.0):
        self.calls: list[str] = []
        self.slow_dirs, self.delay_s = slow_dirs, delay_s

    def __call__(self, d: Path) -> SmokeOutcome:
        self.calls.append(d.name)
        t0 = time.perf_counter()
        if self.slow_dirs and d.name.startswith(self.slow_dirs):
            time.sleep(1.0)
            return SmokeOutcome(False, "too slow", time.perf_counter() - t0)
        time.sleep(self.delay_s)
        p = subprocess.run([sys.executable, "main.py"], cwd=d, capture_output=True, text=True, timeout=60)
        return SmokeOutcome(p.returncode == 0, (p.stdout + p.stderr)[-2000:], time.perf_counter() - t0)


@pytest.fixture
def sent(monkeypatch):
    """The message lists actually sent to litellm, in call order."""
    calls: list[list[dict]] = []
    real = litellm.completion

    def spy(**kw):
        calls.append(kw["messages"])
        return real(**kw)

    monkeypatch.setattr(litellm, "completion", spy)
    return calls


def run(cfg: ImplementerConfig, codebase: Path, tmp_path: Path, smoke=None, **kw) -> Implementation:
    return Implementer(cfg).implement("Make f add 2 instead of 1.", codebase, tmp_path / "work",
                                      context="Print a value. The evaluator is frozen.",
                                      protected=kw.pop("protected", ["evaluator.py"]),
                                      editable=["*.py"], smoke=smoke, entry=["python", "main.py"], **kw)


def test_first_try_success(codebase, tmp_path, sent):
    smoke = Smoke()
    cfg = ImplementerConfig(llm=llm(), samples=1, mock_responses=[GOOD])
    impl = run(cfg, codebase, tmp_path, smoke)
    assert impl.success and impl.failed_stage is None and impl.chain == 0
    assert impl.files_changed == ["util.py"] and "+    return x + 2" in impl.diff and len(impl.normalized_hash) == 64
    assert Path(impl.winning_dir) == tmp_path / "work" / "attempt-0-0"
    assert (Path(impl.winning_dir) / "util.py").read_text() == "def f(x):\n    return x + 2\n"
    assert (codebase / "util.py").read_text() == UTIL
    assert smoke.calls == ["attempt-0-0"]
    [a] = impl.attempts
    assert a["stage"] == "ok" and a["ok"] and not a["infra"] and a["model"] == "openai/gpt-4o-mini"
    assert a["prompt_tokens"] > 0 and a["completion_tokens"] > 0 and a["cost_known"]
    assert a["cost_usd"] == pytest.approx((a["prompt_tokens"] + 2 * a["completion_tokens"]) / 1e6)
    assert impl.cost_usd == pytest.approx(a["cost_usd"]) and impl.llm_calls == 1 and impl.cost_known
    # the prompt: system rules with the format, user message with task, listing and idea
    [msgs] = sent
    assert msgs[0]["role"] == "system" and "<<<<<<< SEARCH" in msgs[0]["content"] and "protected" in msgs[0]["content"]
    user = msgs[1]["content"]
    assert "Print a value." in user and "### util.py" in user and "### evaluator.py (protected: read only)" in user
    assert "Make f add 2 instead of 1." in user and "`python main.py`" in user
    round_trip = Implementation.from_dict(json.loads(json.dumps(impl.to_dict())))
    assert round_trip == impl


def test_search_mismatch_then_revision(codebase, tmp_path, sent):
    cfg = ImplementerConfig(llm=llm(), samples=1, max_revisions=2, mock_responses=[BAD_SEARCH, GOOD, GOOD])
    impl = run(cfg, codebase, tmp_path, Smoke())
    assert impl.success and [a["stage"] for a in impl.attempts] == ["apply", "ok"]
    first_error = impl.attempts[0]["error"]
    assert "not found in util.py" in first_error and "2|     return x + 1" in first_error  # near-match hint
    assert len(sent) == 2
    second = sent[1]
    assert len(second) == 4 and second[2] == {"role": "assistant", "content": BAD_SEARCH}
    assert second[3]["role"] == "user" and first_error in second[3]["content"]
    assert impl.winning_dir.endswith("attempt-0-1") and not (tmp_path / "work" / "attempt-0-0").exists()
    transcript = json.loads((tmp_path / "work" / "transcript-0.json").read_text())
    assert len(transcript["messages"]) == 5 and len(transcript["attempts"]) == 2
    assert impl.llm_calls == 2 and impl.prompt_tokens == sum(a["prompt_tokens"] for a in impl.attempts)


def test_smoke_failure_then_fix(codebase, tmp_path, sent):
    smoke = Smoke()
    cfg = ImplementerConfig(llm=llm(), samples=1, max_revisions=2, mock_responses=[SYNTAX_ERROR, GOOD, GOOD])
    impl = run(cfg, codebase, tmp_path, smoke)
    assert impl.success and [a["stage"] for a in impl.attempts] == ["smoke", "ok"]
    assert "SyntaxError" in impl.attempts[0]["error"] and impl.attempts[0]["smoke_s"] > 0
    assert smoke.calls == ["attempt-0-0", "attempt-0-1"]
    assert "SyntaxError" in sent[1][3]["content"] and "smoke" in sent[1][3]["content"]


def test_protected_edit_is_never_run(codebase, tmp_path):
    smoke = Smoke()
    cfg = ImplementerConfig(llm=llm(), samples=2, max_revisions=2, mock_responses=[PROTECTED])
    impl = run(cfg, codebase, tmp_path, smoke)
    assert not impl.success and impl.failed_stage == "protected" and not impl.infra
    assert "evaluator.py is protected" in impl.error
    assert [(a["chain"], a["stage"]) for a in impl.attempts] == [(0, "protected"), (1, "protected")]
    assert smoke.calls == [] and (codebase / "evaluator.py").read_text() == "SCORE = 0\n"
    assert not list((tmp_path / "work").glob("attempt-*"))


def test_revisions_exhausted(codebase, tmp_path):
    smoke = Smoke()
    # order rule: chain i's attempt j takes item i * (max_revisions + 1) + j
    cfg = ImplementerConfig(llm=llm(), samples=2, max_revisions=1,
                            mock_responses=[BAD_SEARCH, BAD_SEARCH, SYNTAX_ERROR, SYNTAX_ERROR])
    impl = run(cfg, codebase, tmp_path, smoke)
    assert not impl.success and impl.winning_dir is None and impl.diff == ""
    by_chain = {c: [a["stage"] for a in impl.attempts if a["chain"] == c] for c in (0, 1)}
    assert by_chain == {0: ["apply", "apply"], 1: ["smoke", "smoke"]}
    assert impl.failed_stage == "smoke" and "SyntaxError" in impl.error and not impl.infra
    assert sorted(smoke.calls) == ["attempt-1-0", "attempt-1-1"]
    for a in impl.attempts:
        assert a["prompt_tokens"] > 0 and a["completion_tokens"] > 0 and a["cost_usd"] > 0 and a["latency_s"] >= 0
    assert impl.llm_calls == 4 and impl.cost_usd == pytest.approx(sum(a["cost_usd"] for a in impl.attempts))
    # one chain only: the failed stage is that of its last attempt
    only = ImplementerConfig(llm=llm(), samples=1, max_revisions=2, mock_responses=[SYNTAX_ERROR, BAD_SEARCH])
    impl = run(only, codebase, tmp_path / "again", Smoke())
    assert [a["stage"] for a in impl.attempts] == ["smoke", "apply", "smoke"] and impl.failed_stage == "smoke"
    no_revisions = ImplementerConfig(llm=llm(), samples=1, max_revisions=0, mock_responses=[BAD_SEARCH])
    impl = run(no_revisions, codebase, tmp_path / "third")
    assert len(impl.attempts) == 1 and impl.failed_stage == "apply" and "not found" in impl.error


def test_llm_outage_is_infra(codebase, tmp_path):
    cfg = ImplementerConfig(llm=llm(), samples=2, mock_responses=["litellm.InternalServerError"])
    impl = run(cfg, codebase, tmp_path, Smoke())
    assert not impl.success and impl.failed_stage == "llm" and impl.infra
    assert [a["stage"] for a in impl.attempts] == ["llm", "llm"] and all(a["infra"] for a in impl.attempts)
    assert "InternalServerError" in impl.error and impl.prompt_tokens == 0
    # a broken smoke runner is infrastructure too, and is not revised
    def broken(d: Path) -> SmokeOutcome:
        raise RuntimeError("sandbox unavailable")

    cfg = ImplementerConfig(llm=llm(), samples=1, mock_responses=[GOOD])
    impl = run(cfg, codebase, tmp_path / "b", broken)
    assert impl.failed_stage == "smoke" and impl.infra and "sandbox unavailable" in impl.error
    assert len(impl.attempts) == 1


def test_first_winner_stops_other_chains(codebase, tmp_path, sent):
    smoke = Smoke(slow_dirs="attempt-1-", delay_s=0.3)  # chain 1's smoke runs take a second and fail
    cfg = ImplementerConfig(llm=llm(), samples=2, max_revisions=2, mock_responses=[GOOD])
    impl = run(cfg, codebase, tmp_path, smoke)
    assert impl.success and impl.chain == 0
    chain1 = [a for a in impl.attempts if a["chain"] == 1]
    assert [a["stage"] for a in chain1] == ["smoke"]  # no revision was asked for after the win
    assert len(sent) == 2 and impl.llm_calls == 2
    assert impl.cost_usd == pytest.approx(sum(a["cost_usd"] for a in impl.attempts))
    assert sorted(p.name for p in (tmp_path / "work").glob("attempt-*")) == ["attempt-0-0"]


def test_no_smoke_and_pickling(codebase, tmp_path):
    cfg = ImplementerConfig(llm=llm(), samples=1, mock_responses=[GOOD])
    imp = Implementer(cfg)
    impl = imp.implement("idea", codebase, tmp_path / "w")
    assert impl.success and impl.attempts[0]["stage"] == "ok"
    clone = pickle.loads(pickle.dumps(imp))  # what Ray does with the class's arguments and results
    assert clone.cfg == cfg and clone.usage()["calls"] == 0 and imp.usage()["calls"] == 1
    assert pickle.loads(pickle.dumps(impl)) == impl
    with pytest.raises(Exception):
        ImplementerConfig(samples=0)
    with pytest.raises(Exception):
        ImplementerConfig(mock_responses=[])
