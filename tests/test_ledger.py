"""The cost ledger on its own: caps, reservations under threads and processes, compute, kills,
estimates (no LLM calls here; the client side is in test_llm.py)."""
from __future__ import annotations

import pickle
import subprocess
import sys
import threading
from pathlib import Path

import pydantic
import pytest

from selftaught.ledger import BudgetCaps, BudgetError, BudgetExceeded, Ledger, LLMCache

_WORKER = """
import sys
from selftaught.ledger import BudgetExceeded, Ledger
ledger = Ledger(sys.argv[1])  # caps come from the file
ok = 0
for _ in range(int(sys.argv[2])):
    try:
        r = ledger.reserve_usd("worker", 1.0)
    except BudgetExceeded:
        continue
    ledger.settle(r, usd=1.0, prompt_tokens=1, completion_tokens=1)
    ok += 1
print(ok)
"""


def test_caps_config_is_typed():
    with pytest.raises(pydantic.ValidationError):
        BudgetCaps(total_usd=-1)
    with pytest.raises(pydantic.ValidationError):
        BudgetCaps(totl_usd=1)  # typos are errors
    with pytest.raises(pydantic.ValidationError, match="role_usd"):
        BudgetCaps(role_usd={"judge": -0.5})
    assert issubclass(BudgetExceeded, BudgetError) and issubclass(BudgetError, RuntimeError)


def test_usd_caps_reserve_settle_release(tmp_path):
    ledger = Ledger.for_run(tmp_path, caps={"total_usd": 10.0, "role_usd": {"judge": 3.0}})
    assert Path(ledger.path) == tmp_path / "ledger.sqlite"
    r = ledger.reserve_usd("ideator", 6.0)
    with pytest.raises(BudgetExceeded, match="total_usd") as info:
        ledger.reserve_usd("ideator", 4.5)  # 6 held + 4.5 > 10
    assert (info.value.cap, info.value.limit, info.value.used, info.value.reserved, info.value.requested) == \
        ("total_usd", 10.0, 0.0, 6.0, 4.5)
    ledger.settle(r, usd=2.0, prompt_tokens=100, completion_tokens=50)  # actual replaces the worst case
    j = ledger.reserve_usd("judge", 2.5)
    with pytest.raises(BudgetExceeded, match=r"role_usd\[judge\]"):
        ledger.reserve_usd("judge", 1.0)
    ledger.release(j, error=True)  # the call failed: nothing spent, one error
    ledger.check_usd("judge", 3.0)
    ledger.record_hit("judge", 0.75)
    snap = ledger.snapshot()
    assert snap["roles"]["ideator"] == {"calls": 1, "cache_hits": 0, "errors": 0, "prompt_tokens": 100,
                                        "completion_tokens": 50, "usd": 2.0, "saved_usd": 0.0, "reserved_usd": 0.0,
                                        "unsettled_usd": 0.0}
    assert snap["roles"]["judge"]["errors"] == 1 and snap["roles"]["judge"]["saved_usd"] == 0.75
    assert snap["total"]["usd"] == 2.0 and snap["total"]["reserved_usd"] == 0.0
    assert snap["remaining"]["usd"] == 8.0 and snap["remaining"]["role_usd"] == {"judge": 3.0}
    with pytest.raises(ValueError):
        ledger.reserve_usd("x", -1.0)


def test_caps_persist_in_the_file_and_can_be_raised(tmp_path):
    path = tmp_path / "ledger.sqlite"
    first = Ledger(path, caps=BudgetCaps(total_usd=2.0))
    first.add_llm("ideator", usd=1.5, prompt_tokens=10, completion_tokens=10)
    again = Ledger(path)  # another process opening the run's ledger: same caps, same totals
    assert again.caps.total_usd == 2.0 and again.snapshot()["total"]["usd"] == 1.5
    with pytest.raises(BudgetExceeded):
        again.reserve_usd("ideator", 1.0)
    first.set_caps(BudgetCaps(total_usd=5.0))  # resumed with a larger budget
    again.reserve_usd("ideator", 1.0)  # the other handle reads the caps from the file
    assert pickle.loads(pickle.dumps(again)).caps.total_usd == 5.0


def test_reservations_are_atomic_under_threads(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite", caps={"total_usd": 25.0})
    ok, refused = [], []
    barrier = threading.Barrier(8)

    def worker():
        barrier.wait()
        for _ in range(10):
            try:
                r = ledger.reserve_usd("ideator", 1.0)
            except BudgetExceeded:
                refused.append(1)
                continue
            ledger.settle(r, usd=1.0)
            ok.append(1)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = ledger.snapshot()
    assert len(ok) == 25 and len(refused) == 55
    assert snap["total"]["usd"] == 25.0 and snap["total"]["reserved_usd"] == 0.0 and snap["total"]["calls"] == 25


def test_reservations_are_atomic_across_processes(tmp_path):
    path = tmp_path / "l.sqlite"
    Ledger(path, caps={"total_usd": 30.0})
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(path), "20"], stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [int(p.communicate(timeout=120)[0].strip()) for p in procs]
    assert sum(outs) == 30 and Ledger(path).snapshot()["total"]["usd"] == 30.0


def test_holds_of_a_killed_process_are_settled_on_open(tmp_path):
    """A killed process's compute hold is dropped; its LLM call's hold becomes unsettled spend,
    still counted against the caps (the provider may have billed the call)."""
    path = tmp_path / "l.sqlite"
    Ledger(path, caps={"total_usd": 10.0, "gpu_hours": 4.0})
    code = ("import os, sys\nfrom selftaught.ledger import Ledger\nl = Ledger(sys.argv[1])\n"
            "l.reserve_usd('ideator', 9.0)\nl.reserve_compute('gpu', gpu_hours=4.0)\nos._exit(0)\n")
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, timeout=120)  # dies holding both
    ledger = Ledger(path)  # opening settles holds of processes that are gone
    snap = ledger.snapshot()
    assert snap["total"]["reserved_usd"] == 0.0 and snap["total"]["reserved_gpu_hours"] == 0.0
    assert snap["roles"]["ideator"]["unsettled_usd"] == 9.0 and snap["remaining"]["usd"] == pytest.approx(1.0)
    with pytest.raises(BudgetExceeded, match="total_usd"):
        ledger.reserve_usd("ideator", 2.0)  # the maybe-billed 9.0 still counts
    held = ledger.reserve_usd("ideator", 0.5)
    # a live holder is kept; max_age_s settles old holds whatever their owner; unsettled ones stay
    assert ledger.release_stale() == 0 and ledger.release_stale(max_age_s=0.0) == 1
    assert ledger.snapshot()["roles"]["ideator"]["unsettled_usd"] == pytest.approx(9.5) and held.usd == 0.5


def test_compute_caps(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite", caps=BudgetCaps(gpu_hours=2.0, cpu_hours=10.0, jobs=3))
    assert ledger.can_start("gpu-h200", gpu_hours=2.0)
    assert not ledger.can_start("gpu-h200", gpu_hours=2.5)
    r = ledger.reserve_compute("gpu-h200", gpu_hours=1.5, cpu_hours=1.0)
    assert not ledger.can_start("gpu-h200", gpu_hours=1.0)  # 1.5 held + 1.0 > 2
    with pytest.raises(BudgetExceeded, match="gpu_hours"):
        ledger.check_compute("gpu-h200", gpu_hours=1.0)
    ledger.add_compute("gpu-h200", gpu_hours=0.5, cpu_hours=0.5, reservation=r)  # it ran shorter
    ledger.add_compute("cpu-small", cpu_hours=4.0)
    ledger.check_compute("gpu-h200", gpu_hours=1.5)
    with pytest.raises(BudgetExceeded, match="cpu_hours"):
        ledger.check_compute("cpu-small", cpu_hours=6.0)  # 4.5 used
    with pytest.raises(BudgetExceeded, match="jobs") as info:
        ledger.reserve_compute("cpu-small", jobs=2)  # 2 jobs done, cap 3
    assert info.value.used == 2
    held = ledger.reserve_compute("cpu-small", cpu_hours=1.0)
    snap = ledger.snapshot()
    assert snap["envs"]["gpu-h200"]["gpu_hours"] == 0.5 and snap["envs"]["gpu-h200"]["jobs"] == 1
    assert snap["envs"]["cpu-small"]["reserved_jobs"] == 1 and snap["envs"]["cpu-small"]["reserved_cpu_hours"] == 1.0
    assert snap["total"]["jobs"] == 2 and snap["remaining"]["jobs"] == 0 and snap["remaining"]["gpu_hours"] == 1.5
    ledger.release(held)  # never started
    assert ledger.can_start("cpu-small", cpu_hours=1.0) and not ledger.can_start("cpu-small", jobs=2)


def test_a_keyed_compute_charge_is_made_once_even_from_a_reopened_ledger(tmp_path):
    """A caller that crashed after charging a job and before noting it charges it again on
    resume: the key makes the second charge a no-op."""
    ledger = Ledger(tmp_path / "l.sqlite")
    assert ledger.add_compute("toy", cpu_hours=0.25, key="search:evo:abc") is True
    again = Ledger(tmp_path / "l.sqlite")  # the resumed process
    assert again.add_compute("toy", cpu_hours=0.25, key="search:evo:abc") is False
    assert again.add_compute("toy", cpu_hours=0.25, key="search:evo:def") is True
    snap = again.snapshot()["envs"]["toy"]
    assert snap["jobs"] == 2 and snap["cpu_hours"] == pytest.approx(0.5)


def test_estimate_before_a_run(tmp_path):
    from selftaught.llm import LLMConfig, LLMError

    ledger = Ledger(tmp_path / "l.sqlite", caps={"total_usd": 1.0, "role_usd": {"judge": 0.01}})
    cfg = LLMConfig(model="openai/local", input_price_per_mtok=1.0, output_price_per_mtok=2.0)
    e = ledger.estimate(calls=100, prompt_tokens=2000, max_tokens=500, model=cfg, role="judge")
    assert e["per_call_usd"] == pytest.approx((2000 * 1 + 500 * 2) / 1e6) and e["usd"] == pytest.approx(0.3)
    assert e["remaining_usd"] == 1.0 and e["role_remaining_usd"] == 0.01 and not e["fits"]
    assert ledger.estimate(100, 2000, 500, cfg, role="ideator")["fits"]
    known = ledger.estimate(10, 1_000_000, 1_000_000, "gpt-4o-mini")  # litellm's bundled prices
    assert known["per_call_usd"] == pytest.approx(0.15 + 0.6) and not known["fits"]
    assert ledger.estimate(1, 10, 10, "openai/local", input_price_per_mtok=0.0,
                           output_price_per_mtok=0.0)["usd"] == 0.0  # a declared free model
    with pytest.raises(LLMError, match="input_price_per_mtok"):
        ledger.estimate(1, 10, 10, "openai/no-such-priced-model")


def test_cache_store_first_writer_wins_and_reopens(tmp_path):
    path = tmp_path / "cache.sqlite"
    cache = LLMCache(path)
    assert cache.get("k") is None
    cache.put("k", {"text": "first"})
    cache.put("k", {"text": "second"})  # a racing writer of the same request
    other = pickle.loads(pickle.dumps(cache))  # reopened by path, as another process would
    assert other.get("k") == {"text": "first"} and len(other) == 1
