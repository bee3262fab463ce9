"""The novelty gate: exact duplicates by normalised content, near duplicates by MiniLM
embedding similarity in FAISS, with the neighbour each rejected idea repeats."""
from selftaught.novelty import NoveltyConfig, NoveltyGate, content_key


def test_exact_duplicates_by_normalised_content():
    assert content_key("Use RMSNorm instead of LayerNorm.") == content_key("  use rmsnorm, instead of layernorm ")
    assert content_key(knobs={"lr": 1e-3, "schedule": "Cosine"}) == content_key(knobs={"schedule": "cosine",
                                                                                        "lr": 0.0010})
    assert content_key(knobs={"lr": 1e-3}) != content_key(knobs={"lr": 2e-3})
    # the edit decides when there is one: two wordings of one change are one experiment
    diff = "--- a/train.py\n+++ b/train.py\n-x = 1\n+x  =  2\n"
    assert content_key("make x two", edit=diff) == content_key("set x to 2", edit=diff.replace("x  =  2", "x = 2"))
    gate = NoveltyGate(NoveltyConfig(embedder=None))
    assert gate.admit("a", knobs={"lr": 0.001}).novel
    v = gate.admit("b", knobs={"lr": 1e-3})
    assert (v.novel, v.reason, v.neighbour, v.similarity) == (False, "exact_duplicate", "a", 1.0)
    assert gate.admit("c", knobs={"lr": 0.002}).novel and len(gate) == 2
    assert NoveltyGate(NoveltyConfig(enabled=False)).check("anything").novel


def test_near_duplicates_by_embedding_with_the_neighbour_recorded():
    gate = NoveltyGate(NoveltyConfig(threshold=0.8))
    first = "Replace LayerNorm with RMSNorm in every transformer block."
    assert gate.admit("norm", first).novel
    assert gate.admit("warmup", "Add a linear learning-rate warmup over the first 10% of steps.").novel
    near = gate.admit("norm2", "In each transformer block, swap LayerNorm for RMSNorm.")
    assert not near.novel and near.reason == "near_duplicate" and near.neighbour == "norm"
    assert near.similarity >= 0.8
    other = gate.check("Train with a larger batch size and gradient clipping at 1.0.")
    assert other.novel and other.similarity < 0.8
    # knob settings are never judged by their wording, only exactly
    assert gate.admit("k1", knobs={"lr": 0.001}).novel and gate.admit("k2", knobs={"lr": 0.0011}).novel
