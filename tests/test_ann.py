"""Nearest-neighbour search: exact, approximate (recall), sharded over Ray actors."""
import numpy as np
import pytest

from selftaught.ann import AnnConfig, knn, recall_at_k


@pytest.fixture(scope="module")
def vecs():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(40, 32))
    v = centers[rng.integers(0, 40, 3000)] + 0.3 * rng.normal(size=(3000, 32))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def test_exact_matches_brute_force(vecs):
    s, ids = knn(vecs[:500], 5, AnnConfig(kind="exact"))
    brute = np.argsort(-(vecs[:500] @ vecs[:500].T), axis=1)[:, :5]
    assert (ids[:, 0] == np.arange(500)).all() and recall_at_k(ids, brute, 5) == 1.0
    assert np.allclose(s[:, 0], 1.0, atol=1e-5)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_have_high_recall(vecs, kind):
    _, exact = knn(vecs, 10, AnnConfig(kind="exact"))
    _, approx = knn(vecs, 10, AnnConfig(kind=kind, nprobe=8))
    assert recall_at_k(approx, exact, 10) > 0.9


def test_sharded_search_on_ray_actors_equals_single_index(ray_cluster, vecs):
    s1, i1 = knn(vecs, 8, AnnConfig(kind="exact"))
    s2, i2 = knn(vecs, 8, AnnConfig(kind="exact", shards=3))
    assert np.allclose(s1, s2, atol=1e-5) and recall_at_k(i2, i1, 8) > 0.999
