"""The README's code runs as printed: its Usage block, then its deployment block."""

import re
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_the_usage_and_deployment_blocks():
    assert len(python_blocks()) == 2


def test_usage_block_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(python_blocks()[0], {})


def test_deployment_block_runs(tmp_path, monkeypatch):
    pytest.importorskip("onnxscript", reason="ONNX export needs the deploy extra")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    usage, deployment = python_blocks()
    exec(usage, namespace)
    exec(deployment, namespace)
    assert (tmp_path / "model.onnx").exists() and (tmp_path / "model.pt2").exists()
