"""Text utilities shared by every pipeline: cleaning, normalisation, shingles, near-duplicates.

The 13-token shingle rule (SBP pairing and synthesis filters) and Jaccard/MinHash duplicate
rates live here so pairing, synthesis and data-quality reports agree on one definition.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Iterable, Sequence

import numpy as np

_URL = re.compile(r"https?://\S+|www\.\S+")
_MANY_NEWLINES = re.compile(r"\n\s*\n(\s*\n)+")
_SPACES = re.compile(r"[ \t\u00a0]+")
_PUNCT_DIGITS = re.compile(r"[^\w\s]|\d|_")
_WORD = re.compile(r"\S+")

# Common mojibake: UTF-8 bytes decoded as cp1252/latin-1.
_MOJIBAKE_HINT = re.compile("[\u00c2\u00c3\u00e2][\u0080-\u00bf\u2018-\u203a\u20ac]")


def fix_unicode(text: str) -> str:
    """Repair UTF-8 read as latin-1/cp1252 when that clearly happened; NFC-normalise."""
    if _MOJIBAKE_HINT.search(text):
        for enc in ("cp1252", "latin-1"):
            try:
                text = text.encode(enc).decode("utf-8")
                break
            except (UnicodeEncodeError, UnicodeDecodeError):
                continue
    text = text.replace("\ufffd", "")
    return unicodedata.normalize("NFC", text)


def clean_document(text: str, max_url_len: int = 40) -> str:
    """Corpus cleaning: fix broken Unicode, strip long URLs, collapse runs of blank lines."""
    text = fix_unicode(text)
    text = _URL.sub(lambda m: m.group(0) if len(m.group(0)) <= max_url_len else "", text)
    text = _SPACES.sub(" ", text)
    text = _MANY_NEWLINES.sub("\n\n", text)
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def normalize_for_match(text: str) -> str:
    """Lower case, no punctuation, no digits: the form shingles are compared in."""
    return " ".join(_PUNCT_DIGITS.sub(" ", text.lower()).split())


def normalize_answer(text: str) -> str:
    """Lower case, punctuation to spaces, digits kept: the form short answers are compared in
    ("2,381,740 sq km" -> "2 381 740 sq km")."""
    return " ".join(re.sub(r"[^\w]+", " ", fix_unicode(text).lower()).replace("_", " ").split())


def words(text: str) -> list[str]:
    return _WORD.findall(normalize_for_match(text))


def shingles(text: str, n: int = 13) -> set[tuple[str, ...]]:
    toks = words(text)
    return {tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)}


def shares_shingle(a: str, b: str, n: int = 13) -> bool:
    """True when any n-token shingle of ``a`` occurs in ``b`` (SBP's near-copy rule)."""
    sa = shingles(a, n)
    if not sa:
        return False
    toks = words(b)
    return any(tuple(toks[i:i + n]) in sa for i in range(len(toks) - n + 1))


def has_repeated_shingle(text: str, n: int = 13) -> bool:
    """True when some n-token shingle occurs twice in ``text`` (degenerate repetition)."""
    toks = words(text)
    seen: set[tuple[str, ...]] = set()
    for i in range(len(toks) - n + 1):
        s = tuple(toks[i:i + n])
        if s in seen:
            return True
        seen.add(s)
    return False


def repetition_rate(texts: Sequence[str], n: int = 13) -> float:
    if not texts:
        return 0.0
    return sum(has_repeated_shingle(t, n) for t in texts) / len(texts)


def jaccard(a: set, b: set) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / max(len(a | b), 1)


def _hash64(s: str) -> int:
    return int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little")


class MinHasher:
    """MinHash signatures over word n-gram shingles, with LSH banding for near-duplicates."""

    _P = (1 << 61) - 1

    def __init__(self, num_perm: int = 128, ngram: int = 5, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.num_perm, self.ngram = num_perm, ngram
        self.a = rng.integers(1, self._P, size=num_perm, dtype=np.uint64)
        self.b = rng.integers(0, self._P, size=num_perm, dtype=np.uint64)

    def signature(self, text: str) -> np.ndarray:
        toks = words(text)
        grams = {" ".join(toks[i:i + self.ngram]) for i in range(max(len(toks) - self.ngram + 1, 1))}
        h = np.array([_hash64(g) & self._P for g in grams], dtype=np.uint64)
        # (a*h + b) mod p with Python ints would be slow; uint64 wrap-around is an adequate hash.
        vals = (np.outer(h, self.a) + self.b) & np.uint64(self._P)
        return vals.min(axis=0)

    @staticmethod
    def estimate(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
        return float((sig_a == sig_b).mean())


def duplicate_rate(texts: Sequence[str], threshold: float = 0.6, num_perm: int = 128,
                   bands: int = 32, ngram: int = 5) -> float:
    """Fraction of documents that have an earlier near-duplicate (MinHash Jaccard >= threshold)."""
    if len(texts) < 2:
        return 0.0
    mh = MinHasher(num_perm=num_perm, ngram=ngram)
    sigs = [mh.signature(t) for t in texts]
    rows = num_perm // bands
    buckets: dict[tuple[int, bytes], list[int]] = {}
    dup = 0
    for i, sig in enumerate(sigs):
        cands: set[int] = set()
        for bnd in range(bands):
            key = (bnd, sig[bnd * rows:(bnd + 1) * rows].tobytes())
            cands.update(buckets.get(key, ()))
            buckets.setdefault(key, []).append(i)
        if any(MinHasher.estimate(sig, sigs[j]) >= threshold for j in cands):
            dup += 1
    return dup / len(texts)


def chunked(items: Iterable, size: int):
    batch = []
    for it in items:
        batch.append(it)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
