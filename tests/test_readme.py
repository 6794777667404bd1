"""The README's Python examples run as written (on CPU, offline)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_python_block_runs(code, capsys):
    namespace: dict = {"__name__": "readme"}
    exec(compile(code, str(README), "exec"), namespace)  # our own documentation, not user input
    assert capsys.readouterr().out.strip()


def test_readme_quickstart_commands_are_what_ci_runs():
    text = README.read_text()
    assert "pip install -e . && imgcurator demo" in text
    assert 'pip install -e ".[dev,dali]" && python -m pytest -q' in text
    ci = (Path(__file__).parents[1] / ".ci" / "run").read_text()
    assert 'pip install --quiet -e ".[dev,dali]"' in ci and "python -m pytest -q" in ci
