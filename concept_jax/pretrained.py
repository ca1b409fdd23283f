"""Pretrained weights: torchvision / timm / MoCo ResNets and project checkpoints -> Classifier variables.

    loaded = pretrained.load('resnet50-0676ba61.pth')   # or .safetensors, a MoCo .pth.tar, a workdir
    variables = pretrained.merge(model.init(...), loaded)  # strict; 'head' and 'front_door' start fresh

Sources, detected by `load`:
- torchvision state dicts (.pth/.pt/.pth.tar; needs torch, read with weights_only=True). An official
  file name embeds the first 8 hex digits of the file's SHA-256 (resnet50-0676ba61.pth); such files
  are verified before loading.
- .safetensors (no torch needed): torchvision naming, e.g. timm's `resnet50.tv_in1k`
  (`model.safetensors`), whose names equal torchvision's. Convert a .pth once with
      python -c "import torch, safetensors.torch as st; st.save_file(torch.load('IN.pth'), 'OUT.safetensors')"
- MoCo v1/v2 checkpoints: {'state_dict': {'module.encoder_q.<torchvision name>': ...}}; the
  key encoder, the queue and MoCo's projection 'fc' (a 128-d projection in v1, an MLP in v2; neither
  is an ImageNet classifier) are dropped, and the log says so.
- a directory: a concept_jax workdir or checkpoint (`concept_jax.checkpoint.load_variables`). Its
  classifier 'head' (the task it was trained on, e.g. the negative-transfer benchmark's 5-class
  source) is also offered as 'source_head', replacing any source head it had itself, so LwF and
  Co-Tuning can start from it with model.source_classes = its number of classes.

Conversion (torch -> Flax): conv weight OIHW -> kernel HWIO; linear weight (out, in) -> kernel (in, out);
BN weight/bias -> params scale/bias; running_mean/var -> batch_stats mean/var; num_batches_tracked is
ignored; torchvision 'fc' -> 'source_head'; 'layerX.i.downsample.0/1' -> 'layerX_i/downsample_conv/bn'.
"""
import dataclasses
import hashlib
import os
import re
from typing import Any, Mapping, Sequence

from absl import logging
import numpy as np
from flax import traverse_util

# torchvision's ResNet files (IMAGENET1K_V1/_V2, and the pre-2021 names such as resnet50-19c8e357.pth)
# are named <arch>-<first hex digits of their SHA-256>.pth; torch.hub, and torch's model_zoo before it,
# reject a download whose digest does not start with that part, and so does this module.
_HUB_NAME = re.compile(r'^resnet(18|34|50|101|152)-([0-9a-f]{8,})\.pth$')

# Heads that are new in a fine-tuned model: the target classifier, Concept-Tuning's front door,
# Bi-Tuning's projector.
DEFAULT_REINIT = (r'^head/', r'^front_door/', r'^projector/')

_MOCO_PREFIX = 'module.encoder_q.'
_RESNET_KEY = re.compile(
    r'^(conv1|bn1|fc|layer[1-4]\.\d+\.(conv[1-3]|bn[1-3]|downsample\.[01]))\.'
    r'(weight|bias|running_mean|running_var|num_batches_tracked)$')
_EXPECTED = ('a torchvision-style ResNet state dict with keys like conv1.weight, bn1.running_mean, '
             'layer1.0.conv1.weight, layer1.0.downsample.0.weight, fc.weight (torchvision, timm '
             '*.tv_in1k, or MoCo with the module.encoder_q. prefix)')


# ---------------------------------------------------------------------------------------------------
# Reading files.

def expected_sha256_prefix(path: str) -> str | None:
  """The SHA-256 prefix a file's name promises, or None when the name promises nothing."""
  match = _HUB_NAME.match(os.path.basename(path))
  return match.group(2) if match else None


def verify_sha256(path: str, name: str | None = None) -> None:
  """Raises ValueError when a torchvision-named file's SHA-256 does not start with its name's hex part.

  name: the file name that promises the prefix, when `path` is not (yet) named so (a download).
  """
  prefix = expected_sha256_prefix(name or path)
  if prefix is None:
    return
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 22), b''):
      digest.update(chunk)
  actual = digest.hexdigest()
  if not actual.startswith(prefix):
    raise ValueError(
        f'{path}: SHA-256 {actual[:16]}... does not start with {prefix}, the prefix its torchvision file '
        'name promises. The file is corrupt, truncated or not the official one: download it again '
        f'(https://download.pytorch.org/models/{os.path.basename(path)}), or rename it if it is '
        'deliberately a different file.')


def _read_torch(path: str) -> Mapping[str, Any]:
  try:
    import torch  # pylint: disable=g-import-not-at-top  # optional: only .pth files need it
  except ImportError as e:
    raise ImportError(
        f'Reading {path} needs PyTorch (pip install torch), which is optional. Or convert it once, '
        'where torch is installed, to .safetensors and load that: python -c "import torch, '
        "safetensors.torch as st; st.save_file(torch.load('IN.pth'), 'OUT.safetensors')\"; "
        "timm's resnet50.tv_in1k model.safetensors also works as is.") from e
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pickle, zip and weights_only errors all mean "not a readable state dict"
    text = str(e)
    if 'WeightsUnpickler error: ' in text:  # torch's advice to retry with weights_only=False is unsafe
      reason = (text.split('WeightsUnpickler error: ')[1].split('. ')[0] + '. The file holds Python '
                'objects besides tensors; loading it unrestricted could run code from it. Where you '
                'trust it, save its plain state dict (torch.save(model.state_dict(), PATH)) and use that')
    else:
      reason = (text.strip().splitlines() or [type(e).__name__])[0]
    raise ValueError(f'{path} could not be read by torch.load(weights_only=True): {reason}.\n'
                     f'Expected {_EXPECTED}, saved with torch.save.') from e
  if not isinstance(obj, Mapping):
    raise ValueError(f'{path} holds a {type(obj).__name__}, not a state dict. Expected {_EXPECTED}.')
  if 'state_dict' in obj and isinstance(obj['state_dict'], Mapping):
    obj = obj['state_dict']  # MoCo / tllib-style training checkpoints
  out = {}
  for k, v in obj.items():
    if isinstance(v, torch.Tensor):
      out[k] = v.detach().float().numpy() if v.is_floating_point() else v.numpy()
  return out


def _read_safetensors(path: str) -> Mapping[str, np.ndarray]:
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  try:
    return load_file(path)
  except Exception as e:  # SafetensorError, bf16 unsupported by numpy, ...
    raise ValueError(f'{path} is not a readable .safetensors file ({e}). Expected {_EXPECTED}.') from e


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Torch-named float arrays from a .safetensors or torch file (MoCo prefixes stripped, extras dropped)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'No pretrained weights at {path}: pass a .pth/.safetensors file or a '
                            'concept_jax workdir.')
  verify_sha256(path)
  raw = _read_safetensors(path) if path.endswith('.safetensors') else _read_torch(path)
  return _strip_prefixes(path, raw)


def _strip_prefixes(path: str, raw: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  if any(k.startswith(_MOCO_PREFIX) for k in raw):
    dropped = sorted({k.split('.')[1] for k in raw if not k.startswith(_MOCO_PREFIX)})
    state = {k[len(_MOCO_PREFIX):]: v for k, v in raw.items() if k.startswith(_MOCO_PREFIX)}
    fc = sorted(k for k in state if k.startswith('fc.'))
    for k in fc:
      del state[k]
    logging.info('%s: MoCo checkpoint; loading encoder_q only (dropped: %s). Dropped its projection '
                 'head %s: MoCo\'s fc is a %s, not a classifier.', path, dropped or 'nothing', fc,
                 'MLP (v2)' if any(k.startswith('fc.0.') for k in fc) else 'linear projection (v1)')
    return state
  if raw and all(k.startswith('module.') for k in raw):  # saved from DataParallel
    return {k[len('module.'):]: v for k, v in raw.items()}
  return dict(raw)


# ---------------------------------------------------------------------------------------------------
# torch names -> Flax paths.

def _flax_path(key: str, value: np.ndarray) -> tuple[str, str, np.ndarray] | None:
  """(collection, 'a/b/c' path, converted array) for one torch entry; None for ignored entries."""
  module, leaf = key.rsplit('.', 1)
  if leaf == 'num_batches_tracked':
    return None
  if module == 'fc':
    return 'params', f'source_head/{"kernel" if leaf == "weight" else "bias"}', (
        value.T if leaf == 'weight' else value)
  module = re.sub(r'^layer(\d)\.(\d+)\.', r'layer\1_\2/', module)
  module = module.replace('downsample.0', 'downsample_conv').replace('downsample.1', 'downsample_bn')
  path = f'backbone/{module}'
  # The layer type comes from the name: a conv weight of another rank is kept as it is, for merge
  # to report it as a shape mismatch.
  if re.search(r'(^|/)(conv\d|downsample_conv)$', module) and leaf == 'weight':
    return 'params', f'{path}/kernel', value.transpose(2, 3, 1, 0) if value.ndim == 4 else value
  name = {'weight': ('params', 'scale'), 'bias': ('params', 'bias'),
          'running_mean': ('batch_stats', 'mean'), 'running_var': ('batch_stats', 'var')}[leaf]
  return name[0], f'{path}/{name[1]}', value


def convert(path: str, state: Mapping[str, np.ndarray]) -> dict:
  """torchvision state dict -> {'params': {'backbone', ['source_head']}, 'batch_stats': {'backbone'}}."""
  unknown = sorted(k for k in state if not _RESNET_KEY.match(k))
  if not any(_RESNET_KEY.match(k) for k in state) or 'conv1.weight' not in state:
    raise ValueError(f'{path} is not a ResNet state dict: expected {_EXPECTED}. '
                     f'Its first keys are {sorted(state)[:8]} ({len(state)} in all).')
  if unknown:
    raise ValueError(f'{path}: these entries are not part of a torchvision ResNet: {unknown}. '
                     f'Expected {_EXPECTED}.')
  flat = {'params': {}, 'batch_stats': {}}
  for key, value in state.items():
    entry = _flax_path(key, np.asarray(value, np.float32))
    if entry is not None:
      flat[entry[0]][entry[1]] = np.ascontiguousarray(entry[2])
  return {c: traverse_util.unflatten_dict(d, sep='/') for c, d in flat.items()}


def load(path: str) -> dict:
  """{'params': {'backbone', ['source_head'], ...}, 'batch_stats': {'backbone'}} as numpy float32.

  path: a .safetensors file, a torch file (.pth, .pt, .pth.tar; torchvision or MoCo), or a concept_jax
  workdir / checkpoint directory.
  """
  path = os.path.expanduser(path)
  if os.path.isdir(path):
    from concept_jax import checkpoint  # pylint: disable=g-import-not-at-top  # pulls in orbax
    return head_as_source(checkpoint.load_variables(path))
  return convert(path, read_state_dict(path))


def head_as_source(variables: Mapping) -> dict:
  """A trained concept_jax model as the pre-trained network of another: params['source_head'] =
  params['head'] (its task becomes the source task); 'head' itself stays, dropped by default reinit."""
  params = dict(variables['params'])
  params['source_head'] = params['head']
  return {**variables, 'params': params}


# ---------------------------------------------------------------------------------------------------
# Strict merge.

@dataclasses.dataclass
class MergeReport:
  """What merge did, by '<collection>/<path>' name."""
  loaded: list[str]
  reinitialised: list[str]  # kept from init on purpose (matched a reinit pattern)
  dropped: list[str]  # in the checkpoint, deliberately not used (no such head in the model)


def merge_with_report(init_variables: Mapping, loaded: Mapping, *,
                      reinit: Sequence[str] = DEFAULT_REINIT) -> tuple[dict, MergeReport]:
  """Like `merge`, also returning the MergeReport."""
  patterns = [re.compile(p) for p in reinit]
  init_flat = {(c, p): v for c, tree in init_variables.items()
               for p, v in traverse_util.flatten_dict(dict(tree), sep='/').items()}
  loaded_flat = {(c, p): v for c, tree in loaded.items()
                 for p, v in traverse_util.flatten_dict(dict(tree), sep='/').items()}
  model_has_source_head = any(p.startswith('source_head/') for _, p in init_flat)

  merged, report = {}, MergeReport([], [], [])
  missing, unexpected, mismatched = [], [], []
  for (c, p), v in init_flat.items():
    name = f'{c}/{p}'
    if any(r.search(p) for r in patterns):
      merged[(c, p)] = v
      report.reinitialised.append(name)
    elif (c, p) not in loaded_flat:
      missing.append(name)
    elif tuple(np.shape(loaded_flat[(c, p)])) != tuple(np.shape(v)):
      mismatched.append(_mismatch(name, tuple(np.shape(loaded_flat[(c, p)])), tuple(np.shape(v))))
    else:
      merged[(c, p)] = np.asarray(loaded_flat[(c, p)], dtype=v.dtype)
      report.loaded.append(name)
  for (c, p) in loaded_flat:
    if (c, p) in init_flat:
      continue
    if any(r.search(p) for r in patterns) or (p.startswith('source_head/') and not model_has_source_head):
      report.dropped.append(f'{c}/{p}')
    else:
      unexpected.append(f'{c}/{p}')

  if missing or unexpected or mismatched:
    lines = ['Pretrained weights do not fit the model (strict merge).']
    if missing:
      lines += [f'Missing from the checkpoint ({len(missing)}):'] + [f'  {n}' for n in missing]
    if any(n.startswith('params/source_head/') for n in missing):
      lines.append('The checkpoint has no source classifier (e.g. MoCo weights): methods that use '
                   'one (LwF, Co-Tuning) cannot start from it; for any other method set '
                   'model.source_classes=0.')
    if unexpected:
      lines += [f'Unexpected in the checkpoint ({len(unexpected)}):'] + [f'  {n}' for n in unexpected]
    if mismatched:
      lines += [f'Shape mismatches ({len(mismatched)}):'] + [f'  {n}' for n in mismatched]
    lines.append(
        'Hint: check that depth and width match the checkpoint (e.g. depth=50, width=64 for '
        'resnet50); a source_head shape mismatch means model.source_classes differs from the '
        "checkpoint's classes (1000 for ImageNet, a workdir's own classes); layers that are new on "
        f'purpose belong in reinit (now {tuple(reinit)}).')
    raise ValueError('\n'.join(lines))

  out = {}
  for c, tree in init_variables.items():
    out[c] = traverse_util.unflatten_dict(
        {p: merged[(cc, p)] for (cc, p) in merged if cc == c}, sep='/')
  return out, report


def _mismatch(name: str, loaded: tuple, model: tuple) -> str:
  """One mismatch line: the parameter, both shapes, the likely cause."""
  if len(loaded) != len(model):
    cause = ('a different rank: the file does not hold a torchvision ResNet weight here (another '
             'architecture, or a damaged or hand-edited file)')
  elif '/source_head/' in f'/{name}':
    cause = f'source_classes={model[-1]} but the checkpoint classifies {loaded[-1]} classes'
  else:
    cause = (f'wrong width or depth: the checkpoint has {loaded[-1]} channels here, the model '
             f'{model[-1]} (model.width scales every layer; depth 18/34 and 50+ differ in block shapes)')
  return f'{name}: checkpoint {loaded} vs model {model}; likely {cause}'


def merge(init_variables: Mapping, loaded: Mapping, *, reinit: Sequence[str] = DEFAULT_REINIT) -> dict:
  """init_variables with every name taken from `loaded`, except those matching `reinit` (regexes
  searched in the path inside a collection, e.g. 'head/kernel').

  Strict: raises ValueError listing every missing and unexpected name and every shape mismatch.
  A checkpoint's 'source_head' (torchvision's fc) is loaded when the model has one, else dropped.
  Logs what was re-initialised on purpose and what was dropped.
  """
  merged, report = merge_with_report(init_variables, loaded, reinit=reinit)
  logging.info('Pretrained: loaded %d arrays; re-initialised on purpose (%s): %s; dropped: %s',
               len(report.loaded), ', '.join(reinit), report.reinitialised or 'none',
               report.dropped or 'none')
  return merged
