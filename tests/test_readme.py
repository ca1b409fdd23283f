"""README's Functional API example runs as written."""
import os
import re

from tests.conftest import ROOT


def test_functional_api_example_runs(capsys):
  text = open(os.path.join(ROOT, 'README.md')).read()
  section = text[text.index('## Functional API'):]
  code = re.search(r'```python\n(.*?)```', section, re.S).group(1)
  exec(compile(code, 'README.md', 'exec'), {})
  out = capsys.readouterr().out
  assert 'image-level loss' in out
  assert "'concept_contrast'" in out and 'nan' not in out
