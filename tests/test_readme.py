"""README's Functional API example runs as written."""
import os
import re

from tests.conftest import ROOT


def functional_api_example() -> str:
  """The Python code block of README.md's 'Functional API' section."""
  text = open(os.path.join(ROOT, 'README.md')).read()
  section = text[text.index('## Functional API'):]
  return re.search(r'```python\n(.*?)```', section, re.S).group(1)


def check_example_output(out: str):
  assert 'image-level loss' in out
  assert "'concept_contrast'" in out and 'nan' not in out


def test_functional_api_example_runs(capsys):
  exec(compile(functional_api_example(), 'README.md', 'exec'), {})
  check_example_output(capsys.readouterr().out)
