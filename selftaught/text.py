"""Text utilities shared by every pipeline: cleaning, normalisation, shingles, near-duplicates.

The 13-token shingle rule (SBP pairing and synthesis filters) and Jaccard/MinHash duplicate
rates live here so pairing, synthesis and data-quality reports agree on one definition.
Mojibake repair is ftfy's; MinHash signatures and LSH candidate search are datasketch's.
"""
from __future__ import annotations

import re
import unicodedata
from decimal import Decimal, InvalidOperation
from typing import Any, Iterable, Sequence

_URL = re.compile(r"https?://\S+|www\.\S+")
_MANY_NEWLINES = re.compile(r"\n\s*\n(\s*\n)+")
_SPACES = re.compile(r"[ \t\u00a0]+")
_PUNCT_DIGITS = re.compile(r"[^\w\s]|\d|_")
_WORD = re.compile(r"\S+")
# What ftfy could have to repair: a UTF-8 lead byte read as latin-1/cp1252 followed by a
# continuation byte read the same way, C1 controls, lone surrogates. ftfy is thorough but slow
# on long texts (about 1 us a character), so text without any of these skips it.
_MOJIBAKE_PAIR = re.compile("[\u00c2-\u00f4][\u0080-\u00bf\u0152\u0153\u0160\u0161\u0178\u017d\u017e"
                            "\u0192\u02c6\u02dc\u2013\u2014\u2018-\u201e\u2020-\u2022\u2026\u2030"
                            "\u2039\u203a\u20ac\u2122]")
_C1_OR_SURROGATE = re.compile("[\u0080-\u009f\ud800-\udfff]")  # (two searches: one alternation is 50x slower)
_FTFY_CONFIG = None


def fix_unicode(text: str) -> str:
    """Repair mojibake (UTF-8 read as cp1252/latin-1, also when mixed with correct non-Latin
    text or encoded twice) with ftfy, drop U+FFFD, NFC-normalise. Curly quotes, full-width
    characters, ligatures and HTML entities are left as they are: repair, not restyling."""
    global _FTFY_CONFIG
    if text.isascii():
        return text
    if _MOJIBAKE_PAIR.search(text) or _C1_OR_SURROGATE.search(text):
        import ftfy

        if _FTFY_CONFIG is None:
            _FTFY_CONFIG = ftfy.TextFixerConfig(unescape_html=False, uncurl_quotes=False, fix_character_width=False,
                                                fix_latin_ligatures=False, normalization="NFC", explain=False)
        text = ftfy.fix_text(text, _FTFY_CONFIG)
    return unicodedata.normalize("NFC", text.replace("\ufffd", ""))


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


_TEX_TEXT = re.compile(r"\\(?:text|mathrm|textbf|mbox)\{([^{}]*)\}")
_THOUSANDS = re.compile(r"\d(?<![\d,.]\d)\d{0,2}(?:,\d{3})+(?!\d|,\d)")
_NON_CANONICAL_NUMBER = re.compile(r"(?:\d(?<![\w.]\d)\d*\.\d+|\.(?<![\w.]\.)\d+|0(?<![\w.]0)\d+)(?!\w|\.\d)")
# runs of punctuation become spaces, but not a decimal point between digits or a minus sign
# starting a number: those are set aside as \x00 and \x01 first (three plain regex passes;
# patterns start with a character, not a lookbehind, so the regex engine can skip ahead)
_DECIMAL_POINT = re.compile(r"\.(?<=\d\.)(?=\d)")
_MINUS = re.compile(r"-(?<![\w.]-)(?=\.?\d)")
_SEPARATORS = re.compile(r"[^\w\x00\x01]+|_+")


def _canonical_number(m: re.Match) -> str:
    try:
        d = Decimal(m.group(0))
    except InvalidOperation:
        return m.group(0)
    return str(int(d)) if d == d.to_integral_value() else format(d.normalize(), "f")


def normalize_answer(value: Any) -> str:
    """The one form short answers (and the documents they are looked up in) are compared in.

    Rule: repair Unicode; unwrap ``\\text{..}``-style TeX; lower case; numbers lose thousands
    separators, trailing zeros, leading zeros and a leading ``+`` (``"1,000.50"`` ->
    ``"1000.5"``, ``".5"`` -> ``"0.5"``; a minus sign starting a number stays); every other run
    of punctuation (``$``, a final period, commas, hyphens between words) becomes one space;
    spaces collapse. ``"2,381,740 sq km"`` -> ``"2381740 sq km"``, ``" $1,000.50$. "`` ->
    ``"1000.5"``. Applied to both sides, so a padded answer can be searched for in a
    normalised text."""
    s = _TEX_TEXT.sub(r"\1", fix_unicode(str(value))).lower()
    if "," in s:
        s = _THOUSANDS.sub(lambda m: m.group(0).replace(",", ""), s)
    s = _NON_CANONICAL_NUMBER.sub(_canonical_number, s)
    s = _MINUS.sub("\x01", _DECIMAL_POINT.sub("\x00", s.replace("\x00", " ").replace("\x01", " ")))
    return " ".join(_SEPARATORS.sub(" ", s).replace("\x00", ".").replace("\x01", "-").split())


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


def _ngrams(text: str, n: int) -> set[bytes]:
    """Word n-grams of the normalised text (the whole text as one gram when it is shorter)."""
    toks = words(text)
    return {" ".join(toks[i:i + n]).encode() for i in range(max(len(toks) - n + 1, 1))}


def minhash(text: str, ngram: int = 13, num_perm: int = 128, seed: int = 1):
    """A ``datasketch.LeanMinHash`` of the text's word ``ngram``-shingles."""
    from datasketch import LeanMinHash, MinHash

    m = MinHash(num_perm=num_perm, seed=seed)
    m.update_batch(list(_ngrams(text, ngram)))
    return LeanMinHash(m)


def duplicate_rate(texts: Sequence[str], threshold: float = 0.6, ngram: int = 13,
                   num_perm: int = 128, seed: int = 1) -> float:
    """Fraction of documents that have an earlier near-duplicate: MinHash-estimated Jaccard
    similarity of their word ``ngram``-shingle sets >= ``threshold``. Candidates come from
    datasketch's LSH index (bands tuned to the threshold), each confirmed by its estimate."""
    if len(texts) < 2:
        return 0.0
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    sigs = []
    dup = 0
    for i, t in enumerate(texts):
        sig = minhash(t, ngram, num_perm, seed)
        if any(sig.jaccard(sigs[j]) >= threshold for j in lsh.query(sig)):
            dup += 1
        lsh.insert(i, sig)
        sigs.append(sig)
    return dup / len(texts)


def quality_figures(synthetic: Sequence[str], seeds: Sequence[str] = (), outputs: Sequence[str] = (), *,
                    shingle_n: int = 13, pair_shingle_n: int | None = None,
                    duplicate_threshold: float = 0.6) -> dict[str, Any]:
    """A synthetic set's text-quality figures with the configured shingle lengths:
    ``repetition_rate`` and ``duplicate_rate_jaccard_<t>`` over ``synthetic`` with
    ``shingle_n`` (synthesis' rule), ``pair_copying_rate`` over (seed, output) pairs with
    ``pair_shingle_n`` (pairing's rule; ``shingle_n`` when not given), and the lengths used."""
    pn = shingle_n if pair_shingle_n is None else pair_shingle_n
    pairs = list(zip(seeds, outputs))
    return {
        "repetition_rate": repetition_rate(synthetic, shingle_n),
        f"duplicate_rate_jaccard_{duplicate_threshold:g}": duplicate_rate(synthetic, duplicate_threshold, shingle_n),
        "pair_copying_rate": sum(shares_shingle(s, o, pn) for s, o in pairs) / len(pairs) if pairs else None,
        "shingle_n": shingle_n,
        "pair_shingle_n": pn,
    }


def chunked(items: Iterable, size: int):
    batch = []
    for it in items:
        batch.append(it)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
