"""Parsing and applying LLM edits: the three formats, refusals with messages a model can act on,
stable diffs and hashes, protected-file checks."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from envs.edits import (EditError, ProtectedPathError, apply_edits, apply_to_copy, changed_paths, codebase_listing,
                        hash_tree, matches_any, parse_edits)

MAIN = '''import util


def main():
    x = util.f(2)
    print(x)


if __name__ == "__main__":
    main()
'''
UTIL = '''def f(x):
    return x + 1


def g(x):
    return x * 2


def h(x):
    return x - 3
'''
EVAL = "SECRET = 1\n"


@pytest.fixture
def src(tmp_path: Path) -> Path:
    d = tmp_path / "src"
    (d / "pkg").mkdir(parents=True)
    (d / "main.py").write_text(MAIN)
    (d / "util.py").write_text(UTIL)
    (d / "evaluator.py").write_text(EVAL)
    (d / "pkg" / "model.py").write_text("class Model:\n    width = 8\n    depth = 2\n")
    (d / "run.sh").write_text("python main.py\n")
    return d


SR_ANSWER = '''I change f and g, the print, and add a helper module.

```python
util.py
<<<<<<< SEARCH
def f(x):
    return x + 1
=======
def f(x):
    return x + 10
>>>>>>> REPLACE
```

```python
util.py
<<<<<<< SEARCH
def g(x):
    return x * 2
=======
def g(x):
    return x * 3
>>>>>>> REPLACE
```

**main.py**
<<<<<<< SEARCH
    print(x)
=======
    print("x =", x)
>>>>>>> REPLACE

pkg/helper.py
<<<<<<< SEARCH
=======
VALUE = 3
>>>>>>> REPLACE
'''


def test_search_replace_blocks(src, tmp_path):
    dst = tmp_path / "dst"
    a = apply_to_copy(SR_ANSWER, src, dst, protected=["evaluator.py"])
    assert a.files_changed == ["main.py", "pkg/helper.py", "util.py"] and a.created == ["pkg/helper.py"]
    assert a.blocks == 4
    u = (dst / "util.py").read_text()
    assert "return x + 10" in u and "return x * 3" in u and "return x - 3" in u
    assert 'print("x =", x)' in (dst / "main.py").read_text()
    assert (dst / "pkg" / "helper.py").read_text() == "VALUE = 3\n"
    assert (src / "util.py").read_text() == UTIL  # the source is untouched
    assert "--- a/util.py\n+++ b/util.py\n" in a.diff and "--- /dev/null\n+++ b/pkg/helper.py\n" in a.diff
    assert "-    return x + 1\n+    return x + 10\n" in a.diff
    # the diff reproduces the copy: applying it as an answer to the source gives the same tree
    again = apply_to_copy(a.diff, src, tmp_path / "again", protected=["evaluator.py"])
    assert again.diff == a.diff and again.normalized_hash == a.normalized_hash
    assert hash_tree(dst) == hash_tree(tmp_path / "again")


def test_whole_file_blocks(src, tmp_path):
    answer = '''Replacing the model config and adding a note.

FILE: pkg/model.py
```python
class Model:
    width = 16
    depth = 4
```

File: `notes/plan.txt`
```
try a wider model
```
'''
    a = apply_to_copy(answer, src, tmp_path / "dst", protected=["evaluator.py"])
    assert a.files_changed == ["notes/plan.txt", "pkg/model.py"]
    assert (tmp_path / "dst/pkg/model.py").read_text() == "class Model:\n    width = 16\n    depth = 4\n"
    assert (tmp_path / "dst/notes/plan.txt").read_text() == "try a wider model\n"


def test_unified_diff_with_wrong_line_numbers(src, tmp_path):
    answer = '''```diff
diff --git a/util.py b/util.py
--- a/util.py
+++ b/util.py
@@ -40,5 +40,5 @@ def f(x):
 def g(x):
-    return x * 2
+    return x * 5

@@ -99,2 +99,2 @@
 def h(x):
-    return x - 3
+    return x - 4
--- a/main.py
+++ b/main.py
@@ -1,2 +1,3 @@
 import util
+import sys

```
--- /dev/null
+++ b/extra.py
@@ -0,0 +1,2 @@
+A = 1
+B = 2
'''
    a = apply_to_copy(answer, src, tmp_path / "dst")
    assert a.files_changed == ["extra.py", "main.py", "util.py"]
    u = (tmp_path / "dst/util.py").read_text()
    assert "return x * 5" in u and "return x - 4" in u and "return x + 1" in u
    assert (tmp_path / "dst/main.py").read_text().startswith("import util\nimport sys\n\n")
    assert (tmp_path / "dst/extra.py").read_text() == "A = 1\nB = 2\n"


def test_diff_context_must_match(src, tmp_path):
    answer = "--- a/util.py\n+++ b/util.py\n@@ -1,2 +1,2 @@\n def f(y):\n-    return y + 1\n+    return y + 2\n"
    with pytest.raises(EditError, match=r"hunk 1.*not found") as ei:
        apply_to_copy(answer, src, tmp_path / "dst")
    assert "1| def f(x):" in str(ei.value)  # the closest lines, numbered
    assert not (tmp_path / "dst").exists()  # removed again on failure


def test_search_not_found_shows_near_match(src, tmp_path):
    answer = "util.py\n<<<<<<< SEARCH\ndef g(x):\n    return x*2\n=======\ndef g(x):\n    return x*4\n>>>>>>> REPLACE\n"
    with pytest.raises(EditError) as ei:
        apply_edits(answer, src)
    msg = str(ei.value)
    assert "block 1" in msg and "util.py" in msg and "not found" in msg
    assert "5| def g(x):" in msg and "6|     return x * 2" in msg
    assert not isinstance(ei.value, ProtectedPathError)
    assert (src / "util.py").read_text() == UTIL


def test_all_or_nothing_and_ambiguity(src):
    good = "main.py\n<<<<<<< SEARCH\n    print(x)\n=======\n    print(x, x)\n>>>>>>> REPLACE\n"
    ambiguous = "util.py\n<<<<<<< SEARCH\n\n\ndef\n=======\nx\n>>>>>>> REPLACE\n"
    with pytest.raises(EditError):
        apply_edits(good + ambiguous, src)
    assert (src / "main.py").read_text() == MAIN  # the first block was not written either
    twice = "util.py\n<<<<<<< SEARCH\n    return x * 2\n=======\n    return x\n>>>>>>> REPLACE\n"
    (src / "dup.py").write_text("def a(x):\n    return x * 2\n\n\ndef b(x):\n    return x * 2\n")
    with pytest.raises(EditError, match=r"matches 2 places in dup.py \(lines 2, 6\)"):
        apply_edits(twice.replace("util.py", "dup.py"), src)


def test_trailing_whitespace_and_blank_padding_tolerated(src):
    answer = ("util.py\n<<<<<<< SEARCH\n\ndef h(x):   \n    return x - 3\n\n=======\n\ndef h(x):\n"
              "    return x - 30\n\n>>>>>>> REPLACE\n")
    a = apply_edits(answer, src)
    assert a.files_changed == ["util.py"] and (src / "util.py").read_text().endswith("def h(x):\n    return x - 30\n")


def test_protected_paths(src, tmp_path):
    for answer in ("evaluator.py\n<<<<<<< SEARCH\nSECRET = 1\n=======\nSECRET = 2\n>>>>>>> REPLACE\n",
                   "FILE: data/train.txt\n```\nx\n```\n",
                   "--- a/evaluator.py\n+++ /dev/null\n@@ -1 +0,0 @@\n-SECRET = 1\n"):
        with pytest.raises(ProtectedPathError, match="protected"):
            apply_to_copy(answer, src, tmp_path / "dst", protected=["evaluator.py", "data"])
        assert not (tmp_path / "dst").exists()
    # a protected hit wins even when another block of the answer is broken too
    mixed = ("util.py\n<<<<<<< SEARCH\nnope\n=======\nx\n>>>>>>> REPLACE\n"
             "./evaluator.py\n<<<<<<< SEARCH\nSECRET = 1\n=======\nSECRET = 2\n>>>>>>> REPLACE\n")
    with pytest.raises(ProtectedPathError, match="block 2: evaluator.py"):
        apply_edits(mixed, src, ["evaluator.py"])
    assert (src / "evaluator.py").read_text() == EVAL
    assert matches_any("data/x/y.bin", ["data"]) and matches_any("a/b.py", ["*.py"])
    assert not matches_any("b.pyc", ["*.py"]) and not matches_any("sub/evaluator.py", ["evaluator.py"])


def test_editable_globs(src):
    answer = "run.sh\n<<<<<<< SEARCH\npython main.py\n=======\npython main.py --fast\n>>>>>>> REPLACE\n"
    with pytest.raises(EditError, match=r"not an editable path.*\*\.py"):
        apply_edits(answer, src, editable=["*.py"])
    assert apply_edits(answer, src, editable=["*.py", "*.sh"]).files_changed == ["run.sh"]


@pytest.mark.parametrize("path,why", [("../escape.py", "leaves the codebase"), ("/etc/passwd", "absolute"),
                                      ("~/x.py", "absolute"), ("a/../../x.py", "leaves the codebase"),
                                      ("link/x.py", "symbolic link"), ("alias.py", "symbolic link")])
def test_paths_outside_are_refused(src, tmp_path, path, why):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.py").write_text("A = 1\n")
    os.symlink(outside, src / "link")
    os.symlink(src / "util.py", src / "alias.py")
    answer = f"{path}\n<<<<<<< SEARCH\n=======\nB = 2\n>>>>>>> REPLACE\n"
    with pytest.raises(EditError, match=why):
        apply_edits(answer, src)
    assert (outside / "x.py").read_text() == "A = 1\n" and not (tmp_path / "escape.py").exists()


def test_unparseable_and_malformed_answers(src):
    with pytest.raises(EditError, match="no edits found"):
        parse_edits("I think we should use a larger learning rate.")
    with pytest.raises(EditError, match="missing >>>>>>> REPLACE"):
        parse_edits("util.py\n<<<<<<< SEARCH\na\n=======\nb\n")
    with pytest.raises(EditError, match="no file path"):
        parse_edits("<<<<<<< SEARCH\na\n=======\nb\n>>>>>>> REPLACE\n")
    with pytest.raises(EditError, match="does not exist"):
        apply_edits("nothere.py\n<<<<<<< SEARCH\na\n=======\nb\n>>>>>>> REPLACE\n", src)
    with pytest.raises(EditError, match="already exists"):
        apply_edits("util.py\n<<<<<<< SEARCH\n=======\nb\n>>>>>>> REPLACE\n", src)
    with pytest.raises(EditError, match="unchanged"):
        apply_edits("util.py\n<<<<<<< SEARCH\ndef f(x):\n=======\ndef f(x):\n>>>>>>> REPLACE\n", src)


def test_binary_and_huge_files_refused(src):
    (src / "blob.py").write_bytes(b"\x00\x01\x02")
    with pytest.raises(EditError, match="binary"):
        apply_edits("blob.py\n<<<<<<< SEARCH\nx\n=======\ny\n>>>>>>> REPLACE\n", src)
    big = "FILE: big.py\n```\n" + ("x = 1\n" * 1000) + "```\n"
    with pytest.raises(EditError, match="over the limit"):
        apply_edits(big, src, max_file_bytes=1000)
    assert not (src / "big.py").exists()


def test_diff_and_hash_are_stable(src, tmp_path):
    a = "util.py\n<<<<<<< SEARCH\n    return x + 1\n=======\n    return x + 2\n>>>>>>> REPLACE\n"
    b = "util.py\n<<<<<<< SEARCH\n    return x + 1\n=======\n    return x + 2   \n>>>>>>> REPLACE\n"
    c = "util.py\n<<<<<<< SEARCH\n    return x + 1\n=======\n    return x + 3\n>>>>>>> REPLACE\n"
    ra = apply_to_copy(a, src, tmp_path / "a")
    ra2 = apply_to_copy(a, src, tmp_path / "a2")
    rb = apply_to_copy(b, src, tmp_path / "b")
    rc = apply_to_copy(c, src, tmp_path / "c")
    assert ra.diff == ra2.diff and ra.normalized_hash == ra2.normalized_hash
    assert rb.diff != ra.diff and rb.normalized_hash == ra.normalized_hash  # trailing spaces only
    assert rc.normalized_hash != ra.normalized_hash
    assert len(ra.normalized_hash) == 64


def test_hash_tree_detects_changes(src):
    before = hash_tree(src, ["evaluator.py", "pkg"])
    assert set(before) == {"evaluator.py", "pkg/model.py"}
    assert hash_tree(src, []) == {} and "main.py" in hash_tree(src)
    (src / "evaluator.py").write_text("SECRET = 2\n")
    (src / "pkg" / "new.py").write_text("")
    (src / "main.py").write_text("changed\n")  # not watched
    assert changed_paths(before, hash_tree(src, ["evaluator.py", "pkg"])) == ["evaluator.py", "pkg/new.py"]
    (src / "evaluator.py").unlink()
    os.symlink("/etc/hostname", src / "evaluator.py")
    assert "evaluator.py" in changed_paths(before, hash_tree(src, ["evaluator.py", "pkg"]))


def test_codebase_listing(src):
    full = codebase_listing(src, ["*.py"], 100_000, protected=["evaluator.py"])
    heads = [ln for ln in full.splitlines() if ln.startswith("### ")]
    assert heads == ["### evaluator.py (protected: read only)", "### main.py", "### util.py", "### pkg/model.py"]
    assert UTIL in full and "run.sh" not in full
    assert full == codebase_listing(src, ["*.py"], 100_000, protected=["evaluator.py"])  # stable
    (src / "zz_big.py").write_text("".join(f"LINE_{i} = {i}\n" for i in range(2000)))
    small = codebase_listing(src, ["*.py"], 2000)
    assert len(small) < 2400 and "truncated" in small and "not shown" in small and "pkg/model.py" in small
