"""Fetches pre-trained ResNet weights into a local folder, verified, written atomically.

  python -m concept_jax.weights resnet50 --dir weights          # torchvision ImageNet V1
  python -m concept_jax.weights moco_v2 --dir weights           # MoCo v2, 800 epochs

The project's machines reach no model host: fetch on a machine that does, then copy the folder.
A file is downloaded to NAME.part and renamed only once complete and, for torchvision files, once its
SHA-256 matches the prefix in its name; an interrupted or corrupt download never replaces a good file.
"""
import argparse
import os
import shutil
import sys
import urllib.request

from concept_jax import pretrained

TORCHVISION = 'https://download.pytorch.org/models/'
MOCO = 'https://dl.fbaipublicfiles.com/moco/moco_checkpoints/'
# name -> (base URL, file name). torchvision's ImageNet V1 weights are the ones tllib and the official
# Concept-Tuning results use.
KNOWN = {
    'resnet18': (TORCHVISION, 'resnet18-f37072fd.pth'),
    'resnet34': (TORCHVISION, 'resnet34-b627a593.pth'),
    'resnet50': (TORCHVISION, 'resnet50-0676ba61.pth'),
    'resnet50_v2': (TORCHVISION, 'resnet50-11ad3fa6.pth'),
    'resnet101': (TORCHVISION, 'resnet101-63fe2227.pth'),
    'resnet152': (TORCHVISION, 'resnet152-394f9c45.pth'),
    'moco_v1': (MOCO, 'moco_v1_200ep/moco_v1_200ep_pretrain.pth.tar'),
    'moco_v2': (MOCO, 'moco_v2_800ep/moco_v2_800ep_pretrain.pth.tar'),
}


def fetch(name: str, directory: str, *, base_url: str = '') -> str:
  """Downloads weights `name` (a key of KNOWN) into `directory` unless present; returns the path.

  base_url replaces the host part (a mirror, or a local server in tests).
  """
  if name not in KNOWN:
    raise ValueError(f'Unknown weights {name!r}; known: {sorted(KNOWN)}.')
  default_base, file_name = KNOWN[name]
  path = os.path.join(directory, os.path.basename(file_name))
  if os.path.exists(path):
    pretrained.verify_sha256(path)
    return path
  os.makedirs(directory, exist_ok=True)
  url = (base_url or default_base) + file_name
  part = path + '.part'
  try:
    with urllib.request.urlopen(url, timeout=60) as response, open(part, 'wb') as f:
      shutil.copyfileobj(response, f, length=1 << 22)
  except OSError as e:
    raise OSError(f'Could not download {url}: {e}. Fetch it on a machine with access to that host '
                  f'and put it at {path}.') from e
  try:
    pretrained.verify_sha256(part, name=path)
  except ValueError:
    os.remove(part)
    raise
  os.replace(part, path)
  return path


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m concept_jax.weights', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('name', choices=sorted(KNOWN))
  parser.add_argument('--dir', default='weights')
  parser.add_argument('--base_url', default='')
  args = parser.parse_args(argv)
  try:
    print(fetch(args.name, args.dir, base_url=args.base_url))
  except (OSError, ValueError) as e:
    sys.exit(f'concept_jax.weights: error: {e}')


if __name__ == '__main__':
  main()
