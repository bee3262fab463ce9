"""Turn an LLM's answer into file edits, safely.

The implementer asks a model to change a codebase; this module is the only place where its text
becomes changes on disk, so it is strict where that protects the experiment (paths stay inside
the codebase, protected files such as the evaluator are never touched, binary or oversized
results are refused) and lenient where models are sloppy (three edit formats, wrong line numbers
in diffs, trailing whitespace). Every refusal is an :class:`EditError` whose message is written
for the model: it names the block and the file and, when a SEARCH text is not found, shows the
closest lines of the file, so a revision can fix it. Pure Python: no Ray, no LLM, no subprocess.

Formats accepted (in any mix, applied in the order they appear):

1. search/replace blocks: a line holding the file path, then ``<<<<<<< SEARCH`` / exact lines /
   ``=======`` / replacement lines / ``>>>>>>> REPLACE`` (fences around them are fine; an empty
   SEARCH on a new path creates the file);
2. whole files: a line ``FILE: relative/path`` followed by a fenced block with the new content;
3. unified diffs (``--- a/x`` / ``+++ b/x`` / ``@@`` hunks, fenced or bare), applied by context
   (line numbers are only a hint).

All edits of one answer are staged in memory and written only when every one of them applies,
so a failed answer leaves the directory as it was.
"""
from __future__ import annotations

import difflib
import fnmatch
import hashlib
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

MAX_FILE_BYTES = 1_000_000  # largest file an edit may produce
MAX_TOTAL_BYTES = 4_000_000  # sum over all files an answer changes
SKIP_DIRS = frozenset({".git", "__pycache__", ".pytest_cache", ".mypy_cache", ".ipynb_checkpoints", "node_modules"})

_SEARCH = re.compile(r"^\s*<{5,9}\s*SEARCH\b.*$")
_DIVIDER = re.compile(r"^\s*={5,9}\s*$")
_REPLACE = re.compile(r"^\s*>{5,9}\s*REPLACE\b.*$")
_FENCE = re.compile(r"^\s*(`{3,}|~{3,})(.*)$")
_FILE_LINE = re.compile(r"^[\s#*>]*file\s*:\s*(.+?)\s*$", re.IGNORECASE)
_HUNK = re.compile(r"^@@\s*-(\d+)(?:,(\d+))?\s+\+(\d+)(?:,(\d+))?\s*@@")
_PATHLIKE = re.compile(r"^[\w.\-/\\~:+@]+$")
_PATH_PREFIX = re.compile(r"^(?:file\s*path|file\s*name|filename|file|path)\s*:\s*", re.IGNORECASE)


class EditError(ValueError):
    """An answer that cannot be applied; the message is meant to be shown to the model."""


class ProtectedPathError(EditError):
    """An edit to a protected path: a rule violation, not a mistake to revise."""


@dataclass
class Hunk:
    old: list[str]  # context and removed lines, without line ends
    new: list[str]  # context and added lines
    start: int | None = None  # 1-based old line number from the header (a hint only)


@dataclass
class Edit:
    """One parsed edit. ``kind``: ``replace`` (search/replace), ``file`` (whole file) or
    ``diff`` (unified diff of one file; ``path`` None on the old side creates, ``new_path``
    None deletes)."""

    kind: Literal["replace", "file", "diff"]
    path: str | None
    block: int  # 1-based position in the answer, for messages
    search: list[str] = field(default_factory=list)
    replace: list[str] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    new_path: str | None = None  # diff only
    hunks: list[Hunk] = field(default_factory=list)

    def paths(self) -> list[str]:
        out = [p for p in (self.path, self.new_path) if p is not None]
        return list(dict.fromkeys(out))

    def label(self) -> str:
        name = {"replace": "SEARCH/REPLACE block", "file": "FILE block", "diff": "diff"}[self.kind]
        return f"{name} {self.block}"


@dataclass
class AppliedEdit:
    """What an answer changed: paths, a unified diff against the original, and a hash of that
    diff with whitespace normalised (equal for edits that differ only in trailing spaces)."""

    files_changed: list[str]
    diff: str
    normalized_hash: str
    created: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    blocks: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- text helpers
@dataclass
class _Text:
    """A text file as lines without their ends, plus how to write it back."""

    lines: list[str]
    final_newline: bool = True
    nl: str = "\n"

    @classmethod
    def parse(cls, text: str) -> "_Text":
        if not text:
            return cls([], True)
        nl = "\r\n" if "\r\n" in text and text.count("\r\n") == text.count("\n") else "\n"
        lines = text.split(nl)
        final = lines[-1] == ""
        if final:
            lines.pop()
        return cls(lines, final, nl)

    def render(self) -> str:
        if not self.lines:
            return ""
        return self.nl.join(self.lines) + (self.nl if self.final_newline else "")


def _split_keepends(text: str) -> list[str]:
    return re.findall(r"[^\n]*\n|[^\n]+$", text)


def _same(a: str, b: str) -> bool:
    return a.rstrip() == b.rstrip()


def _find_all(lines: list[str], block: list[str]) -> list[int]:
    """Start indices where ``block`` occurs in ``lines``, ignoring trailing whitespace."""
    n, m = len(lines), len(block)
    if m == 0 or m > n:
        return []
    first = block[0].rstrip()
    return [i for i in range(n - m + 1)
            if lines[i].rstrip() == first and all(_same(lines[i + k], block[k]) for k in range(1, m))]


def _trim_blank(lines: list[str]) -> list[str]:
    lo, hi = 0, len(lines)
    while lo < hi and not lines[lo].strip():
        lo += 1
    while hi > lo and not lines[hi - 1].strip():
        hi -= 1
    return lines[lo:hi]


def closest_lines(lines: list[str], wanted: list[str], max_show: int = 30) -> str:
    """The lines of a file most similar to ``wanted`` (a SEARCH text), with line numbers, or a
    sentence saying there are none."""
    wanted = [w for w in wanted] or [""]
    m = min(len(wanted), max(len(lines), 1))
    if not lines:
        return "The file is empty."
    want_stripped = [w.strip() for w in wanted]
    scored: list[tuple[float, int]] = []
    for i in range(0, len(lines) - m + 1):
        window = [x.strip() for x in lines[i:i + m]]
        sm = difflib.SequenceMatcher(None, want_stripped, window, autojunk=False)
        scored.append((sm.ratio(), i))
    # first non-blank wanted line, matched fuzzily, proposes more starts (whole lines may differ)
    anchor = next(((k, w) for k, w in enumerate(want_stripped) if w), None)
    if anchor:
        k, w = anchor
        stripped = [x.strip() for x in lines]
        for hit in difflib.get_close_matches(w, stripped, n=5, cutoff=0.5):
            for i, x in enumerate(stripped):
                if x == hit:
                    scored.append((0.0, max(0, min(i - k, len(lines) - m))))
    scored.sort(key=lambda t: -t[0])
    seen: set[int] = set()
    best, best_i = -1.0, 0
    want_text = "\n".join(wanted)
    for _, i in scored[:12]:
        if i in seen:
            continue
        seen.add(i)
        r = difflib.SequenceMatcher(None, want_text, "\n".join(lines[i:i + m]), autojunk=False).ratio()
        if r > best:
            best, best_i = r, i
    if best < 0.3:
        head = "\n".join(f"{j + 1:>5}| {lines[j]}" for j in range(min(len(lines), 10)))
        return f"No similar lines were found; the file begins with:\n{head}"
    shown = range(best_i, min(best_i + max(m, 1), best_i + max_show, len(lines)))
    body = "\n".join(f"{j + 1:>5}| {lines[j]}" for j in shown)
    return (f"The closest lines in the file ({best:.0%} similar, lines {best_i + 1}-{shown[-1] + 1}) are:\n"
            f"{body}")


# --------------------------------------------------------------------------- paths
def _norm_pattern(p: str) -> str:
    p = p.strip().replace("\\", "/")
    while p.startswith("./"):
        p = p[2:]
    return p.rstrip("/")


def matches_any(rel: str, patterns: Iterable[str] | None) -> bool:
    """Whether ``rel`` (posix, relative to the codebase root) or one of its parent directories
    matches one of the fnmatch globs (so ``data`` also covers ``data/x.bin``; ``*`` crosses
    ``/``, so ``*.py`` covers every Python file)."""
    pats = [_norm_pattern(p) for p in (patterns or []) if p and _norm_pattern(p)]
    if not pats:
        return False
    parts = rel.split("/")
    prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatchcase(pre, pat) for pre in prefixes for pat in pats)


def safe_relpath(path: str, root: Path | None = None) -> str:
    """Normalise a path from an answer to a posix path inside the codebase, or raise
    :class:`EditError`: absolute paths, ``..``, backslashes and (given ``root``) symbolic links
    on the way are refused."""
    raw = path
    if not path or "\x00" in path:
        raise EditError(f"invalid file path {raw!r}")
    if "\\" in path:
        raise EditError(f"file path {raw!r} contains a backslash; use forward slashes, relative to the codebase root")
    if path.startswith(("/", "~")) or re.match(r"^[A-Za-z]:", path):
        raise EditError(f"file path {raw!r} is absolute; paths must be relative to the codebase root")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise EditError(f"file path {raw!r} leaves the codebase ('..' is not allowed)")
    if not parts:
        raise EditError(f"invalid file path {raw!r}")
    rel = "/".join(parts)
    if root is not None:
        root = Path(root)
        cur = root
        for p in parts:
            cur = cur / p
            if cur.is_symlink():
                raise EditError(f"file path {rel!r} goes through a symbolic link; edit the real file instead")
        real_root = root.resolve()
        target = (root / rel).resolve()
        if target != real_root and real_root not in target.parents:
            raise EditError(f"file path {rel!r} resolves outside the codebase")
        if (root / rel).is_dir():
            raise EditError(f"{rel!r} is a directory, not a file")
    return rel


# --------------------------------------------------------------------------- parsing
def _path_from_line(line: str) -> str | None:
    """The file path a line names (``train.py``, ``**src/a.py**``, ``File: a.py``,
    ``### a.py``, ``In `a.py`:``), or None for prose."""
    s = line.strip().strip("#*> \t").strip()
    s = _PATH_PREFIX.sub("", s).strip()
    s = s.strip("`'\"*").rstrip(":").strip("`'\"* ")
    if s and _PATHLIKE.match(s) and re.search(r"[A-Za-z0-9]", s):
        return s
    ticks = [t for t in re.findall(r"`([^`\s]+)`", line) if _PATHLIKE.match(t) and ("." in t or "/" in t)]
    return ticks[0] if len(ticks) == 1 else None


def _fence_close(lines: list[str], i: int, opener: str) -> int | None:
    ch, n = opener[0], len(opener)
    pat = re.compile(r"^\s*" + re.escape(ch) + "{" + str(n) + r",}\s*$")
    for j in range(i, len(lines)):
        if pat.match(lines[j]):
            return j
    return None


def _diff_path(s: str) -> str | None:
    s = s.split("\t")[0].strip().strip('"')
    return None if s == "/dev/null" else s


def _parse_diff(lines: list[str], i: int, block: int) -> tuple[Edit, int]:
    """Parse one file's diff starting at its ``---`` line; returns the edit and the next index."""
    old, new = _diff_path(lines[i][4:]), _diff_path(lines[i + 1][4:])
    if (old is None or old.startswith("a/")) and (new is None or new.startswith("b/")) and (old or new):
        old = old[2:] if old else None
        new = new[2:] if new else None
    if old is None and new is None:
        raise EditError(f"diff {block}: both sides are /dev/null")
    edit = Edit("diff", old, block, new_path=new)
    j = i + 2
    n = len(lines)
    while j < n and lines[j].startswith("@@"):
        m = _HUNK.match(lines[j])
        start = int(m.group(1)) if m else None
        j += 1
        body: list[str] = []
        while j < n:
            ln = lines[j]
            if ln.startswith("@@") or ln.startswith("diff --git") or _FENCE.match(ln):
                break
            if ln.startswith("--- ") and j + 1 < n and lines[j + 1].startswith("+++ "):
                break
            if ln.startswith("\\"):  # "\ No newline at end of file"
                j += 1
                continue
            if ln == "" or ln[0] in " +-":
                body.append(ln)
                j += 1
                continue
            break
        while body and body[-1] == "":  # blank lines after a hunk separate it from prose
            body.pop()
        hunk = Hunk([], [], start)
        for ln in body:
            tag, text = (ln[0], ln[1:]) if ln else (" ", "")
            if tag in " -":
                hunk.old.append(text.rstrip("\r"))
            if tag in " +":
                hunk.new.append(text.rstrip("\r"))
        if hunk.old or hunk.new:
            edit.hunks.append(hunk)
    if not edit.hunks:
        raise EditError(f"diff {block} ({new or old}): no @@ hunks follow the ---/+++ header")
    return edit, j


def _holds_other_format(lines: list[str], j: int, fence: re.Match) -> bool:
    """Whether the fence opened at ``j`` holds a diff or SEARCH/REPLACE blocks rather than a
    whole file (``FILE: x`` is then just the path line of those)."""
    if fence.group(2).strip().lower() in ("diff", "patch", "udiff"):
        return True
    end = _fence_close(lines, j + 1, fence.group(1))
    body = lines[j + 1:end if end is not None else len(lines)]
    if any(_SEARCH.match(ln) for ln in body):
        return True
    k = next((k for k, ln in enumerate(body) if ln.strip()), None)
    return k is not None and k + 1 < len(body) and body[k].startswith("--- ") and body[k + 1].startswith("+++ ")


def parse_edits(text: str) -> list[Edit]:
    """All edits in an answer, in order; :class:`EditError` when a block is malformed or there
    are none."""
    lines = text.replace("\r\n", "\n").split("\n")
    edits: list[Edit] = []
    candidate: str | None = None  # the last non-blank, non-fence line outside a block
    last_sr_path: str | None = None
    i, n = 0, len(lines)
    while i < n:
        line = lines[i]
        if _SEARCH.match(line):
            block = len(edits) + 1
            path = _path_from_line(candidate) if candidate is not None else None
            if path is None:
                path = last_sr_path
            if path is None:
                raise EditError(f"SEARCH/REPLACE block {block}: no file path on the line before <<<<<<< SEARCH")
            j = i + 1
            search: list[str] = []
            while j < n and not _DIVIDER.match(lines[j]):
                if _SEARCH.match(lines[j]) or _REPLACE.match(lines[j]):
                    raise EditError(f"SEARCH/REPLACE block {block} ({path}): expected ======= after the SEARCH lines")
                search.append(lines[j])
                j += 1
            if j >= n:
                raise EditError(f"SEARCH/REPLACE block {block} ({path}): missing ======= divider")
            j += 1
            replace: list[str] = []
            while j < n and not _REPLACE.match(lines[j]):
                if _SEARCH.match(lines[j]) or _DIVIDER.match(lines[j]):
                    raise EditError(f"SEARCH/REPLACE block {block} ({path}): missing >>>>>>> REPLACE "
                                    "at the end of the block")
                replace.append(lines[j])
                j += 1
            if j >= n:
                raise EditError(f"SEARCH/REPLACE block {block} ({path}): missing >>>>>>> REPLACE at the end")
            edits.append(Edit("replace", path, block, search=search, replace=replace))
            last_sr_path, candidate, i = path, None, j + 1
            continue
        fm = _FILE_LINE.match(line)
        if fm:
            j = i + 1
            while j < n and not lines[j].strip():
                j += 1
            fence = _FENCE.match(lines[j]) if j < n else None
            if fence and not _holds_other_format(lines, j, fence):
                block = len(edits) + 1
                path = _path_from_line(fm.group(1)) or fm.group(1).strip().strip("`*")
                end = _fence_close(lines, j + 1, fence.group(1))
                if end is None:
                    raise EditError(f"FILE block {block} ({path}): the {fence.group(1)} fence is never closed")
                edits.append(Edit("file", path, block, content=lines[j + 1:end]))
                candidate, i = None, end + 1
                continue
        if line.startswith("--- ") and i + 1 < n and lines[i + 1].startswith("+++ "):
            edit, i = _parse_diff(lines, i, len(edits) + 1)
            edits.append(edit)
            candidate = None
            continue
        if line.strip() and not _FENCE.match(line):
            candidate = line
        i += 1
    if not edits:
        raise EditError("no edits found in the answer: expected a file path line followed by "
                        "<<<<<<< SEARCH / ======= / >>>>>>> REPLACE blocks (or FILE: blocks, or a unified diff)")
    return edits


# --------------------------------------------------------------------------- applying
def _read_text(path: Path, rel: str, what: str) -> _Text:
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        raise EditError(f"{what}: {rel} is a binary file; it cannot be edited as text")
    try:
        return _Text.parse(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise EditError(f"{what}: {rel} is not UTF-8 text; it cannot be edited") from None


def _apply_replace(doc: _Text | None, e: Edit) -> _Text:
    rel = e.path
    search, replace = [s.rstrip("\r") for s in e.search], [r.rstrip("\r") for r in e.replace]
    if not _trim_blank(search):
        if doc is None:
            return _Text(list(replace), True)
        if not doc.lines:
            return _Text(list(replace), True, doc.nl)
        raise EditError(f"{e.label()}: the SEARCH section is empty but {rel} already exists; an empty SEARCH "
                        "creates a new file. To change the existing file, copy the lines to change into SEARCH.")
    if doc is None:
        raise EditError(f"{e.label()}: {rel} does not exist (the line before <<<<<<< SEARCH must be the path "
                        "of an existing file, relative to the codebase root; use an empty SEARCH to create a file)")
    hits = _find_all(doc.lines, search)
    if not hits and _trim_blank(search) != search:
        # models often pad SEARCH with blank lines the file does not have; drop them (and the
        # same padding of REPLACE) and try again
        lead = next(k for k, ln in enumerate(search) if ln.strip())
        trail = next(k for k, ln in enumerate(reversed(search)) if ln.strip())
        search = search[lead:len(search) - trail]
        while lead and replace and not replace[0].strip():
            replace, lead = replace[1:], lead - 1
        while trail and replace and not replace[-1].strip():
            replace, trail = replace[:-1], trail - 1
        hits = _find_all(doc.lines, search)
    if len(hits) > 1:
        exact = [h for h in hits if doc.lines[h:h + len(search)] == search]
        hits = exact if len(exact) == 1 else hits
    if not hits:
        raise EditError(f"{e.label()}: the SEARCH text was not found in {rel}. SEARCH must copy the current lines "
                        f"exactly (indentation, comments, blank lines).\n"
                        f"{closest_lines(doc.lines, search)}")
    if len(hits) > 1:
        where = ", ".join(str(h + 1) for h in hits[:10])
        raise EditError(f"{e.label()}: the SEARCH text matches {len(hits)} places in {rel} (lines {where}); "
                        "include more surrounding lines so that it matches exactly one place")
    h = hits[0]
    return _Text(doc.lines[:h] + replace + doc.lines[h + len(search):], doc.final_newline, doc.nl)


def _apply_hunks(doc: _Text | None, e: Edit, rel: str) -> _Text:
    lines = list(doc.lines) if doc is not None else []
    offset, cursor = 0, 0
    for k, hunk in enumerate(e.hunks, 1):
        hint = None if hunk.start is None else max(hunk.start - 1, 0) + offset
        if not hunk.old:
            if lines and hint is None:
                raise EditError(f"{e.label()} ({rel}), hunk {k}: no context lines and no line number; "
                                "include a few unchanged lines around the addition")
            pos = 0 if not lines else min(hint if hint is not None else 0, len(lines))
            if hunk.start == 0:
                pos = 0
        else:
            hits = _find_all(lines, hunk.old)
            if not hits:
                raise EditError(f"{e.label()} ({rel}), hunk {k}: its context and removed lines were not found in "
                                f"the file; they must match the current lines exactly.\n"
                                f"{closest_lines(lines, hunk.old)}")
            after = [h for h in hits if h >= cursor] or hits
            ref = hint if hint is not None else cursor
            pos = min(after, key=lambda h: (abs(h - ref), h))
        lines[pos:pos + len(hunk.old)] = hunk.new
        cursor = pos + len(hunk.new)
        offset += len(hunk.new) - len(hunk.old)
    if doc is None:
        return _Text(lines, True)
    return _Text(lines, doc.final_newline, doc.nl)


def _file_diff(rel: str, old: str | None, new: str | None) -> str:
    def prep(text: str | None) -> list[str]:
        out = _split_keepends(text or "")
        if out and not out[-1].endswith("\n"):
            out[-1] += "\n\\ No newline at end of file\n"
        return out

    return "".join(difflib.unified_diff(prep(old), prep(new), "/dev/null" if old is None else f"a/{rel}",
                                        "/dev/null" if new is None else f"b/{rel}"))


def _normalize(text: str | None) -> list[str]:
    lines = [ln.expandtabs(4).rstrip() + "\n" for ln in (text or "").split("\n")]
    while lines and lines[-1] == "\n":
        lines.pop()
    return lines


def diff_and_hash(changes: dict[str, tuple[str | None, str | None]]) -> tuple[str, str]:
    """Unified diff (paths ``a/…``, ``b/…``) of ``{rel: (old, new)}`` (None: absent) in path
    order, and the sha256 of the same diff computed on whitespace-normalised text without
    context (trailing spaces, tabs and final blank lines do not change it)."""
    parts, norm = [], []
    for rel in sorted(changes):
        old, new = changes[rel]
        parts.append(_file_diff(rel, old, new))
        body = "".join(difflib.unified_diff(_normalize(old), _normalize(new), n=0, lineterm="\n"))
        if body:
            norm.append(f"### {rel} {'created' if old is None else 'deleted' if new is None else 'modified'}\n"
                        + "".join(ln for ln in body.splitlines(keepends=True) if not ln.startswith(("---", "+++"))))
    return "".join(parts), hashlib.sha256("".join(norm).encode()).hexdigest()


def apply_edits(answer: str, codebase_dir: str | Path, protected: Sequence[str] = (),
                editable: Sequence[str] | None = None, *, max_file_bytes: int = MAX_FILE_BYTES,
                max_total_bytes: int = MAX_TOTAL_BYTES) -> AppliedEdit:
    """Parse ``answer`` and apply it to ``codebase_dir`` in place; all or nothing.

    ``protected`` globs (relative to the root) may not be edited, created or deleted
    (:class:`ProtectedPathError`, checked before anything else); with ``editable`` given, only
    paths matching those globs may be changed. The diff is against the directory as it was.
    """
    root = Path(codebase_dir)
    edits = parse_edits(answer)
    # Paths first: a protected-path violation wins over any other problem of the answer.
    resolved: list[tuple[Edit, list[str]]] = []
    for e in edits:
        rels = []
        for p in e.paths():
            try:
                rel = safe_relpath(p, root)
            except EditError as err:
                raise EditError(f"{e.label()}: {err}") from None
            if matches_any(rel, protected):
                raise ProtectedPathError(f"{e.label()}: {rel} is protected and may not be edited, created or deleted")
            rels.append(rel)
        resolved.append((e, rels))
    for e, rels in resolved:
        for rel in rels:
            if editable is not None and not matches_any(rel, editable):
                raise EditError(f"{e.label()}: {rel} is not an editable path; editable files match "
                                f"{', '.join(editable)}")

    originals: dict[str, str | None] = {}
    staged: dict[str, _Text | None] = {}  # current state; None = absent

    def load(rel: str, what: str) -> _Text | None:
        if rel not in staged:
            p = root / rel
            if p.exists():
                doc = _read_text(p, rel, what)
                staged[rel], originals[rel] = doc, doc.render()
            else:
                staged[rel] = originals[rel] = None
        doc = staged[rel]
        return None if doc is None else _Text(list(doc.lines), doc.final_newline, doc.nl)

    for e, rels in resolved:
        if e.kind == "replace":
            rel = rels[0]
            staged[rel] = _apply_replace(load(rel, e.label()), e)
        elif e.kind == "file":
            rel = rels[0]
            before = load(rel, e.label())
            staged[rel] = _Text([c.rstrip("\r") for c in e.content], True, before.nl if before else "\n")
        else:
            old_rel = safe_relpath(e.path) if e.path else None
            new_rel = safe_relpath(e.new_path) if e.new_path else None
            src = load(old_rel, e.label()) if old_rel else None
            if old_rel and src is None:
                raise EditError(f"{e.label()}: {old_rel} does not exist (use --- /dev/null to create a file)")
            if old_rel is None and new_rel and load(new_rel, e.label()) is not None:
                raise EditError(f"{e.label()}: {new_rel} already exists; diff it against a/{new_rel}, not /dev/null")
            result = _apply_hunks(src, e, new_rel or old_rel or "")
            if new_rel is None:
                if result.lines:
                    raise EditError(f"{e.label()}: deleting {old_rel} needs every line removed")
                staged[old_rel] = None  # type: ignore[index]
            else:
                if old_rel and old_rel != new_rel:
                    load(new_rel, e.label())
                    staged[old_rel] = None
                staged[new_rel] = result

    changes: dict[str, tuple[str | None, str | None]] = {}
    total = 0
    for rel, doc in staged.items():
        new = None if doc is None else doc.render()
        if new == originals[rel]:
            continue
        if new is not None:
            size = len(new.encode("utf-8"))
            if "\x00" in new:
                raise EditError(f"the new content of {rel} contains NUL bytes; only text files can be written")
            if size > max_file_bytes:
                raise EditError(f"the new {rel} would be {size} bytes, over the limit of {max_file_bytes}")
            total += size
        changes[rel] = (originals[rel], new)
    if total > max_total_bytes:
        raise EditError(f"the edited files total {total} bytes, over the limit of {max_total_bytes}")
    if not changes:
        raise EditError("the edits leave the codebase unchanged (every block's replacement equals its original)")

    for rel, (_, new) in changes.items():
        p = root / rel
        if new is None:
            p.unlink()
            continue
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "w", encoding="utf-8", newline="") as f:
            f.write(new)
    diff, nhash = diff_and_hash(changes)
    return AppliedEdit(files_changed=sorted(changes), diff=diff, normalized_hash=nhash,
                       created=sorted(r for r, (o, _) in changes.items() if o is None),
                       deleted=sorted(r for r, (_, n) in changes.items() if n is None), blocks=len(edits))


def copy_codebase(src_dir: str | Path, dst_dir: str | Path) -> Path:
    """Copy a codebase (symlinks as links, caches skipped) to a new directory."""
    dst = Path(dst_dir)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} already exists and is not an empty directory")
    if dst.exists():
        dst.rmdir()
    shutil.copytree(src_dir, dst, symlinks=True, ignore=shutil.ignore_patterns(*SKIP_DIRS, "*.pyc"))
    return dst


def apply_to_copy(answer: str, src_dir: str | Path, dst_dir: str | Path, protected: Sequence[str] = (),
                  editable: Sequence[str] | None = None, **limits: int) -> AppliedEdit:
    """Copy ``src_dir`` to ``dst_dir`` (which must not exist or be empty) and apply ``answer``
    there; the diff is against ``src_dir``. On any error ``dst_dir`` is removed again."""
    parse_edits(answer)  # an unparseable answer costs no copy
    dst = copy_codebase(src_dir, dst_dir)
    try:
        return apply_edits(answer, dst, protected, editable, **limits)
    except BaseException:
        shutil.rmtree(dst, ignore_errors=True)
        raise


# --------------------------------------------------------------------------- trees and listings
def _walk(root: Path) -> list[str]:
    """Files (and symlinks) under ``root`` as posix paths, skipping cache directories."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        base = Path(dirpath)
        for d in dirnames:
            if (base / d).is_symlink():  # os.walk does not descend into links: list the link itself
                filenames.append(d)
        for f in filenames:
            out.append((base / f).relative_to(root).as_posix())
    return sorted(set(out))


def hash_tree(directory: str | Path, patterns: Sequence[str] | None = None) -> dict[str, str]:
    """sha256 of each file under ``directory`` matching ``patterns`` (all files when None; a
    symlink is hashed by its target), for checking protected files before and after a job."""
    root = Path(directory)
    out: dict[str, str] = {}
    if patterns is not None and not list(patterns):
        return out
    for rel in _walk(root):
        if patterns is not None and not matches_any(rel, patterns):
            continue
        p = root / rel
        h = hashlib.sha256()
        if p.is_symlink():
            h.update(b"symlink:" + os.readlink(p).encode())
        else:
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        out[rel] = h.hexdigest()
    return out


def changed_paths(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Paths added, removed or changed between two :func:`hash_tree` results."""
    return sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))


def codebase_listing(directory: str | Path, editable: Sequence[str] | None = None, max_chars: int = 60_000,
                     protected: Sequence[str] = ()) -> str:
    """The text files matching ``editable`` (all when None), top-level first then by path, each
    under a ``### path`` header in a fence; protected ones are marked read-only. Once about
    ``max_chars`` are used, a file is cut with a note and the rest are only named."""
    root = Path(directory)
    rels = [r for r in _walk(root) if editable is None or matches_any(r, editable)]
    rels.sort(key=lambda r: (r.count("/"), r))
    parts: list[str] = []
    omitted: list[str] = []
    used = 0
    for rel in rels:
        p = root / rel
        if p.is_symlink() or not p.is_file():
            continue
        data = p.read_bytes()
        if b"\x00" in data[:8192]:
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        longest = max((len(m) for m in re.findall(r"`{3,}", text)), default=2)
        fence = "`" * max(3, longest + 1)
        mark = " (protected: read only)" if matches_any(rel, protected) else ""
        head, tail = f"### {rel}{mark}\n{fence}\n", f"{fence}\n"
        body = text if text.endswith("\n") or not text else text + "\n"
        block = head + body + tail
        if used + len(block) <= max_chars:
            parts.append(block)
            used += len(block)
            continue
        room = max_chars - used - len(head) - len(tail) - 80
        if room < 400:
            omitted.append(rel)
            continue
        lines = _split_keepends(body)
        kept, size = [], 0
        for ln in lines:
            if size + len(ln) > room:
                break
            kept.append(ln)
            size += len(ln)
        note = f"[... truncated: showing {len(kept)} of {len(lines)} lines]\n"
        parts.append(head + "".join(kept) + note + tail)
        used += len(parts[-1])
    if omitted:
        names = ", ".join(omitted[:50]) + (f" and {len(omitted) - 50} more" if len(omitted) > 50 else "")
        parts.append(f"[not shown, listing limit reached: {names}]\n")
    if not parts:
        return "[no files to show]\n"
    return "\n".join(parts)
