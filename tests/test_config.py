import pytest
from pydantic import ValidationError

from selftaught.config import (EngineConfig, SamplingConfig, Strict, apply_overrides, fingerprint,
                               parse_override, resolve, save)


class Inner(Strict):
    lr: float = 1e-3
    steps: int = 10


class Outer(Strict):
    name: str = "x"
    trainer: Inner = Inner()
    tags: list[str] = []


def test_parse_override_types():
    assert parse_override("trainer.lr=3e-4") == (["trainer", "lr"], 3e-4)
    assert parse_override("a=true") == (["a"], True)
    assert parse_override("tags=[a, b]") == (["tags"], ["a", "b"])
    with pytest.raises(ValueError):
        parse_override("no_equals_sign")


def test_resolve_file_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: run\ntrainer:\n  steps: 5\n")
    cfg = resolve(Outer, f, ["trainer.lr=3e-4", "tags=[x]"])
    assert (cfg.name, cfg.trainer.steps, cfg.trainer.lr, cfg.tags) == ("run", 5, 3e-4, ["x"])
    saved = save(cfg, tmp_path / "out" / "config.yaml")
    assert resolve(Outer, saved) == cfg


def test_unknown_keys_and_bad_values_are_errors(tmp_path):
    with pytest.raises(ValidationError):
        resolve(Outer, None, ["trainer.lrr=1"])
    with pytest.raises(ValidationError):
        resolve(Outer, None, ["trainer.steps=notanint"])
    with pytest.raises(ValidationError):
        SamplingConfig(top_p=0)


def test_fingerprint_is_stable_and_sensitive():
    a, b = Outer(), Outer()
    assert fingerprint(a) == fingerprint(b)
    b.trainer.lr = 2e-3
    assert fingerprint(a) != fingerprint(b)
    assert fingerprint({"x": 1, "y": 2}) == fingerprint({"y": 2, "x": 1})


def test_engine_config_defaults():
    e = EngineConfig()
    assert e.backend == "auto" and e.max_batch_size >= 1
