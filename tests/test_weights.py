"""The weight fetcher against a local HTTP server: verified, atomic, clear about failures."""
import functools
import hashlib
import http.server
import threading

import pytest

from concept_jax import weights


@pytest.fixture
def server(tmp_path):
  root = tmp_path / 'served'
  root.mkdir()
  handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
  httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield root, f'http://127.0.0.1:{httpd.server_address[1]}/'
  httpd.shutdown()


def _serve(root, file_name, payload):
  (root / file_name).write_bytes(payload)


def test_fetch_verifies_and_keeps_the_file(tmp_path, server, monkeypatch):
  root, url = server
  payload = b'weights' * 1000
  prefix = hashlib.sha256(payload).hexdigest()[:8]
  monkeypatch.setitem(weights.KNOWN, 'resnet50', (weights.TORCHVISION, f'resnet50-{prefix}.pth'))
  _serve(root, f'resnet50-{prefix}.pth', payload)
  path = weights.fetch('resnet50', str(tmp_path / 'w'), base_url=url)
  assert open(path, 'rb').read() == payload
  assert weights.fetch('resnet50', str(tmp_path / 'w'), base_url='http://127.0.0.1:9/') == path


def test_corrupt_download_is_rejected_and_not_left_behind(tmp_path, server):
  root, url = server
  _serve(root, 'resnet50-0676ba61.pth', b'truncated')
  with pytest.raises(ValueError, match='does not start with 0676ba61'):
    weights.fetch('resnet50', str(tmp_path / 'w'), base_url=url)
  assert list((tmp_path / 'w').iterdir()) == []


def test_unreachable_host_says_what_to_do(tmp_path, server):
  _, url = server
  with pytest.raises(OSError, match='put it at'):
    weights.fetch('resnet18', str(tmp_path / 'w'), base_url=url + 'missing/')
