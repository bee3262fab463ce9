import pyarrow as pa
import pytest

from selftaught.storage import RunDir, file_fingerprint, read_parquet, write_parquet


def test_parquet_roundtrip_and_parts(tmp_path):
    write_parquet([{"id": "a", "x": 1}, {"id": "b", "x": 2}], tmp_path / "t.parquet")
    assert read_parquet(tmp_path / "t.parquet").to_pylist()[1] == {"id": "b", "x": 2}
    stage = RunDir(tmp_path / "run").stage("gen", config={"k": 1})
    stage.begin()
    parts = stage.parts()
    parts.write(0, {"v": [1, 2]})
    parts.write(3, {"v": [3]})
    assert parts.completed() == {0, 3} and parts.done(3) and not parts.done(1)
    assert sorted(parts.read()["v"].to_pylist()) == [1, 2, 3]


def test_stage_skip_and_rerun_only_affected(tmp_path):
    run = RunDir(tmp_path)
    a = run.stage("a", config={"lr": 1})
    b = run.stage("b", config={"n": 2}, deps=[a])
    for s in (a, b):
        s.begin()
        write_parquet({"v": [1]}, s.path / "out.parquet")
        s.finish(rows=1)
    assert run.stage("a", config={"lr": 1}).complete
    assert run.stage("b", config={"n": 2}, deps=[a]).complete
    assert a.seconds is not None and 0 <= a.seconds < 60  # wall clock of the finishing attempt
    # Changing b's config reruns b only; changing a's reruns a and (through the dep hash) b.
    assert not run.stage("b", config={"n": 3}, deps=[a]).complete
    a2 = run.stage("a", config={"lr": 2})
    assert not a2.complete and not run.stage("b", config={"n": 2}, deps=[a2]).complete
    # A stale stage is cleared on begin, a same-hash partial one is kept for resuming.
    a2.begin()
    assert not (a2.path / "out.parquet").exists()
    b.begin()
    assert (b.path / "out.parquet").exists() and b.outputs == {"rows": 1}


def test_input_file_change_changes_fingerprint(tmp_path):
    f = tmp_path / "in.txt"
    f.write_text("one")
    before = file_fingerprint(f)
    f.write_text("three")
    assert file_fingerprint(f) != before
    assert file_fingerprint(tmp_path / "missing") == "missing"


def test_read_parquet_missing_is_clear(tmp_path):
    with pytest.raises((FileNotFoundError, pa.ArrowInvalid, OSError)):
        read_parquet(tmp_path / "nope.parquet")
