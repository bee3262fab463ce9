from selftaught.text import (MinHasher, chunked, clean_document, duplicate_rate, fix_unicode,
                             has_repeated_shingle, jaccard, normalize_for_match, repetition_rate,
                             shares_shingle, shingles)

LONG = ("the quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat "
        "near the old wooden door of the house")


def test_cleaning_and_normalising():
    assert fix_unicode("caf\u00c3\u00a9") in ("café", "caf\u00c3\u00a9")  # mojibake fixed when detectable
    text = clean_document("  Hello\u00a0 world \n\n\n\nSecond   para  ")
    assert "Hello world" in text and "\n\n\n" not in text
    assert normalize_for_match("Hello, WORLD!") == normalize_for_match("hello world")


def test_shingle_rules():
    other = "a completely different sentence about model training and data pipelines with many words"
    assert len(shingles(LONG)) > 0 and shares_shingle(LONG, "prefix " + LONG)
    assert not shares_shingle(LONG, other)
    assert has_repeated_shingle(LONG + " " + LONG) and not has_repeated_shingle(LONG)
    assert repetition_rate([LONG, LONG + " " + LONG]) == 0.5


def test_minhash_duplicates():
    mh = MinHasher(num_perm=64)
    assert MinHasher.estimate(mh.signature(LONG), mh.signature(LONG)) == 1.0
    assert duplicate_rate([LONG, LONG, "something else entirely different words here"]) > 0
    assert jaccard({1, 2}, {2, 3}) == 1 / 3
    assert [list(c) for c in chunked(range(5), 2)] == [[0, 1], [2, 3], [4]]
