"""Fine-tuning methods by name; each is a module named after its paper."""
import importlib

_METHODS = {
    'erm': 'concept_jax.methods.erm:ERM',
    'concept_tuning': 'concept_jax.methods.concept_tuning:ConceptTuning',
    'lwf': 'concept_jax.methods.lwf:LwF',
    'co_tuning': 'concept_jax.methods.co_tuning:CoTuning',
    'bi_tuning': 'concept_jax.methods.bi_tuning:BiTuning',
    'l2_sp': 'concept_jax.methods.l2_sp:L2SP',
    'delta': 'concept_jax.methods.delta:DELTA',
    'bss': 'concept_jax.methods.bss:BSS',
    'stoch_norm': 'concept_jax.methods.stoch_norm:StochNormERM',
}


def names() -> tuple[str, ...]:
  return tuple(_METHODS)


def get(name: str):
  """The Method class registered under `name`."""
  if name not in _METHODS:
    raise ValueError(f'method.name={name!r} is unknown; choose one of {sorted(_METHODS)}.')
  module, cls = _METHODS[name].split(':')
  return getattr(importlib.import_module(module), cls)
