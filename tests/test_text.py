import random

from selftaught.text import (chunked, clean_document, duplicate_rate, fix_unicode, has_repeated_shingle, jaccard,
                             minhash, normalize_answer, normalize_for_match, quality_figures, repetition_rate,
                             shares_shingle, shingles)

LONG = ("the quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat "
        "near the old wooden door of the house")


def test_cleaning_and_normalising():
    assert fix_unicode("caf\u00c3\u00a9") == "café"
    text = clean_document("  Hello\u00a0 world \n\n\n\nSecond   para  ")
    assert "Hello world" in text and "\n\n\n" not in text
    assert normalize_for_match("Hello, WORLD!") == normalize_for_match("hello world")


def test_mojibake_is_repaired_not_restyled():
    # mojibake next to text that is already right, or encoded twice: the hand-written repair
    # (one cp1252 round trip of the whole string) left all of these broken
    for broken, repaired in (("The caf\u00c3\u00a9 in 東京", "The café in 東京"),
                             ("it\u00e2\u20ac\u2122s \u201cquoted\u201d", "it\u2019s \u201cquoted\u201d"),
                             ("na\u00c3\u00afve fa\u00e7ade", "naïve façade"),
                             ("caf\u00c3\u0192\u00c2\u00a9", "café")):
        assert fix_unicode(broken) == repaired
    assert clean_document("Caf\u00c3\u00a9 S\u00c3\u00a3o Paulo \u2014 ok") == "Café São Paulo \u2014 ok"
    # correct text is left alone: curly quotes, full-width forms, ligatures, entities
    for ok in ("São Paulo — “ok”", "ｆｕｌｌ", "ﬁne", "a &amp; b"):
        assert fix_unicode(ok) == ok
    assert fix_unicode("bad \ufffd char") == "bad  char"


def test_normalize_answer_rule():
    # one rule for answers and the texts they are looked up in
    assert normalize_answer(" $1,000.50$. ") == "1000.5" and normalize_answer("\\text{Paris}") == "paris"
    assert normalize_answer("2,381,740 sq km") == normalize_answer("2381740 sq km") == "2381740 sq km"
    assert normalize_answer("3.0") == "3" and normalize_answer(".5") == "0.5" and normalize_answer("+5") == "5"
    assert normalize_answer("-5") == "-5" != normalize_answer("5")
    assert normalize_answer("In 1990, the Caf\u00c3\u00a9 closed.") == "in 1990 the café closed"
    assert normalize_answer("1990-2000") == "1990 2000" and normalize_answer("x-5") == "x 5" != normalize_answer("x -5")
    doc = f" {normalize_answer('Its area is 2,381,740.0 sq km, the largest.')} "
    assert f" {normalize_answer('2381740 sq km')} " in doc


def test_shingle_rules():
    other = "a completely different sentence about model training and data pipelines with many words"
    assert len(shingles(LONG)) > 0 and shares_shingle(LONG, "prefix " + LONG)
    assert not shares_shingle(LONG, other)
    assert has_repeated_shingle(LONG + " " + LONG) and not has_repeated_shingle(LONG)
    assert repetition_rate([LONG, LONG + " " + LONG]) == 0.5


VOCAB = [f"w{a}{b}".replace("0", "zero").replace("1", "one") for a in "abcdefghij" for b in "abcdefghij"]


def _doc(rng: random.Random, n: int = 80) -> list[str]:
    return [rng.choice(VOCAB) for _ in range(n)]


def test_minhash_duplicates():
    sig = minhash(LONG, ngram=5, num_perm=64)
    assert sig.jaccard(minhash(LONG, ngram=5, num_perm=64)) == 1.0
    assert duplicate_rate([LONG, LONG, "something else entirely different words here"], ngram=5) > 0
    assert jaccard({1, 2}, {2, 3}) == 1 / 3
    assert [list(c) for c in chunked(range(5), 2)] == [[0, 1], [2, 3], [4]]


def test_duplicate_rate_at_jaccard_0_6_on_known_near_duplicates():
    rng = random.Random(0)
    base = [_doc(rng) for _ in range(20)]
    near = []
    for d in base[:5]:  # one word changed at the end: 13-shingle Jaccard ~0.85
        d = list(d)
        d[-1] = "changed"
        near.append(d)
    far = []
    for d in base[5:8]:  # the second half replaced: Jaccard ~0.3, not a near-duplicate
        far.append(d[:40] + _doc(rng, 40))
    texts = [" ".join(d) for d in base + near + far]
    assert duplicate_rate(texts, threshold=0.6, ngram=13) == 5 / 28
    assert duplicate_rate([" ".join(d) for d in base], threshold=0.6, ngram=13) == 0.0


def test_quality_figures_use_the_configured_shingle_length():
    rng = random.Random(1)
    # pairs that differ in every 16th word: near-duplicates for 2-token shingles (Jaccard ~0.78),
    # unrelated for 13-token ones (~0.1)
    texts = []
    for _ in range(10):
        d = _doc(rng)
        e = [w if (i % 16) != 15 else "x" + w for i, w in enumerate(d)]
        texts += [" ".join(d), " ".join(e)]
    short, long = quality_figures(texts, shingle_n=2), quality_figures(texts, shingle_n=13)
    assert short["shingle_n"] == 2 and long["shingle_n"] == 13
    assert short["duplicate_rate_jaccard_0.6"] == 0.5 and long["duplicate_rate_jaccard_0.6"] == 0.0
    # pair copying follows the pairing rule's length when it is given separately
    seed, out = texts[0], " ".join(texts[0].split()[:6]) + " and then something else"
    f = quality_figures([out], [seed], [out], shingle_n=13, pair_shingle_n=5)
    assert f["pair_copying_rate"] == 1.0 and f["pair_shingle_n"] == 5
    assert quality_figures([out], [seed], [out], shingle_n=13)["pair_copying_rate"] == 0.0
    rep = " ".join(_doc(rng, 6))
    assert quality_figures([rep + " " + rep], shingle_n=5)["repetition_rate"] == 1.0
    assert quality_figures([rep + " " + rep], shingle_n=13)["repetition_rate"] == 0.0
