"""The README's Python snippets, run as written, so that they cannot rot.

Every ```python block of the README's "Use it from Python" section runs in
a fresh namespace, in the repository root's temporary copy of its workdir;
the checks after each are on what the snippet promises.
"""

import os
import pathlib
import re

import numpy as np
import pytest

README = pathlib.Path(__file__).parent.parent / "README.md"


def _snippets():
  text = README.read_text(encoding="utf-8")
  start = text.index("## Use it from Python")
  section = text[start:text.index("\n## ", start + 1)]
  return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_section_has_both_snippets():
  snippets = _snippets()
  assert len(snippets) == 2
  assert "cm.mrf_loss" in snippets[0] and "cm.run(" in snippets[1]


@pytest.mark.real_weights
def test_losses_snippet(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  namespace = {}
  exec(compile(_snippets()[0], "README.md", "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["grad"].shape == (64, 64, 3)
  assert np.isfinite(float(namespace["loss"])) and namespace["loss"] > 0
  assert float(np.abs(namespace["grad"]).max()) > 0


@pytest.mark.real_weights
@pytest.mark.slow
def test_synthesis_snippet(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  namespace = {}
  exec(compile(_snippets()[1], "README.md", "exec"), namespace)  # pylint: disable=exec-used
  result = namespace["result"]
  assert namespace["image"].shape == (64, 54, 3)
  assert (tmp_path / "workdir" / "notebook" / "result.png").is_file()
  last = [r for r in result.history if r["level"] == 1]
  assert last[-1]["loss"][0] < last[0]["loss"][0]  # it fell at the finest
  assert os.path.exists(result.paths[0])
