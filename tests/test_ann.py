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


def test_sharded_index_reads_its_own_parquet_parts_and_self_joins(ray_cluster, vecs, tmp_path):
    """Shards load their own files; the self-join over shards equals a single exact index."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from selftaught.ann import ShardedIndex, pairs_above

    files = []
    for p, (a, b) in enumerate([(0, 1000), (1000, 2200), (2200, 3000)]):
        f = tmp_path / f"part-{p}.parquet"
        emb = pa.FixedSizeListArray.from_arrays(pa.array(vecs[a:b].reshape(-1)), vecs.shape[1])
        pq.write_table(pa.table({"row": np.arange(a, b), "embedding": emb}), f)
        files.append(str(f))
    index = ShardedIndex.from_parquet(files, AnnConfig(kind="exact", shards=2, query_batch=700))
    try:
        got_ids, got_s, got_n = map(np.concatenate, zip(*index.self_join(6)))
        assert sorted(got_ids.tolist()) == list(range(3000))
        order = np.argsort(got_ids)
        s1, i1 = knn(vecs, 6, AnnConfig(kind="exact"))
        assert np.allclose(got_s[order], s1, atol=1e-5) and recall_at_k(got_n[order], i1, 6) > 0.999
        assert all(m > 0 for m in index.memory_mb())
    finally:
        index.close()
    seeds, nbrs, scores = pairs_above(np.arange(3000), s1, i1, 0.9)
    loop = [(i, j) for i in range(3000) for s, j in zip(s1[i], i1[i]) if j != i and s > 0.9]
    assert list(zip(seeds.tolist(), nbrs.tolist())) == loop and (scores > 0.9).all()
