"""FGVC-Aircraft (100 variants), CUB's recipe (the official release gives none for Aircraft).

Run (put fgvc-aircraft-2013b.tar.gz in DIR/downloads/manual, then
`python -m concept_jax.data.prepare --data=aircraft --data_dir=DIR`):
  python -m concept_jax.main --config configs/aircraft.py:sr=100 --workdir runs/aircraft_ct_100 \
      --config.data.data_dir=DIR --config.pretrained.path=weights/resnet50-0676ba61.pth
Arguments: sr (15/30/50/100), method (any of concept_jax.methods.names()), seed, tiny (see
concept_jax/recipes.py::recipe).
Expected top-1 (tllib, official protocol): ERM 41.6 / 57.8 / 68.7 / 80.2, Bi-Tuning 47.2 / 64.3 / 73.7 /
84.3, Co-Tuning 45.9 / 61.2 / 71.3 / 82.2 at 15/30/50/100; BSS 43.6 / 59.5 / 69.6 / 81.2, DELTA 44.4 /
61.9 / 71.4 / 82.7, StochNorm 44.3 / 60.6 / 70.1 / 81.5 (tllib's README); L2-SP: none published. The
paper reports Concept-Tuning above the best of these.
"""

from concept_jax import recipes


def _edit(c, a):
  if a.method == 'concept_tuning':
    c.method.confusing = 99  # every other class, as CUB's 199


def get_config(arg=None):
  return recipes.recipe(arg, data='aircraft', num_classes=100, edit=_edit)
