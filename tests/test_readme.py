"""README's first fenced block holds the two commands; CI runs exactly the second one."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_readme_test_command():
    text = (ROOT / "README.md").read_text()
    block = text.split("```")[1].splitlines()[1:]
    lines = [x for x in block if x.strip()]
    assert len(lines) == 2 and "selftaught sbp" in lines[0]
    assert lines[1] in (ROOT / ".ci" / "run").read_text().splitlines()
