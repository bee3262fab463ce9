"""The Ray Data embedding pool (actors/embedder.py) against in-process embedding."""
from __future__ import annotations

import numpy as np
import pytest

from actors.embedder import embed_dataset, embed_texts, plan_pool
from tests.conftest import wiki_texts


@pytest.mark.parametrize("num_actors,cores,threads,expected", [
    (2, 2, None, (1, 2)),   # 2 cores: one actor with both threads, not two single-thread ones
    (1, 2, None, (1, 2)),
    (2, 4, None, (2, 2)),
    (3, 8, None, (3, 2)),   # spare cores stay free
    (2, 1, None, (1, 1)),
    (2, 2, 1, (2, 1)),      # explicit threads per actor
    (4, 2, 4, (1, 4)),
])
def test_plan_pool_gives_whole_threads(num_actors, cores, threads, expected):
    assert plan_pool(num_actors, cores, threads) == expected


def test_plan_pool_min_threads_one_keeps_actor_count():
    assert plan_pool(2, 2, min_threads_per_actor=1) == (2, 1)


@pytest.mark.parametrize("kwargs", [
    {},                                                          # defaults (one call per actor here)
    {"threads_per_actor": 1, "batch_size": 4, "rows_per_call": 5},  # 2 actors, several calls each
])
def test_embed_dataset_matches_embed_texts_in_row_order(ray_cluster, kwargs):
    import ray.data

    texts = wiki_texts(23)
    texts[3] = texts[3] * 3  # lengths differ a lot, so batches are sorted and padded
    ds = ray.data.from_items([{"row": i, "text": t} for i, t in enumerate(texts)])
    rows = embed_dataset(ds, "minilm", 2, kwargs.pop("batch_size", 64), **kwargs).take_all()
    assert [r["row"] for r in rows] == list(range(len(texts)))  # input order, no row lost
    assert [r["text"] for r in rows] == texts
    got = np.stack([np.asarray(r["embedding"]) for r in rows])
    assert got.dtype == np.float32 and got.shape == (len(texts), 384)
    np.testing.assert_allclose(got, embed_texts(texts), atol=1e-5)
    # the caller's dataset is not switched to ordered execution
    assert ds.context.execution_options.preserve_order is ray.data.DataContext.get_current(
    ).execution_options.preserve_order
