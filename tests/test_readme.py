"""Every Python example in the README runs, from a scratch directory, and prints what it says."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_python_examples() -> None:
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index: int, tmp_path: Path) -> None:
    code = BLOCKS[index]
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, f"README example {index} failed:\n{code}\n{out.stderr}"
    # Where the example says what it prints (# ... after print), check it.
    for line in code.splitlines():
        said = re.match(r"\s*print\(.*\)\s*#\s*(b?'[^']*')", line)
        if said:
            value = ast.literal_eval(said.group(1))
            printed = repr(value) if isinstance(value, bytes) else value
            assert printed in out.stdout.splitlines(), (line, out.stdout)
