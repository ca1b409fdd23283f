"""CUB-200-2011, the official Concept-Tuning recipe (ResNet-50, ImageNet weights, 224 px).

Run (data prepared once with `python -m concept_jax.data.prepare --data=cub200 --data_dir=DIR`):
  python -m concept_jax.main --config configs/cub200.py:sr=100 --workdir runs/cub200_ct_100 \
      --config.data.data_dir=DIR --config.pretrained.path=weights/resnet50-0676ba61.pth
Arguments: sr (sampling rate 15/30/50/100), method (any of concept_jax.methods.names()), seed, tiny (CPU
smoke run on a synthetic 200-class data set shaped like CUB, no weights).
Recipe: 40 epochs x 500 iterations, batch 48, SGD-Nesterov lr 0.01 (x0.1 at epochs 12 and 24), backbone
at 0.1x lr, weight decay 5e-4, confusing 199 (every other class).
Expected top-1, official protocol (best epoch, max of main and IB head, on test), seed 0:
  concept_tuning sr=100: 85.14 (official README). ERM (tllib): 51.2 / 64.6 / 74.6 / 81.8 at 15/30/50/100.
  Bi-Tuning (tllib): 55.8 / 69.3 / 77.2 / 83.1.
  LwF (tllib): 56.7 / 66.8 / 73.4 / 81.5; tllib ran it at lr 0.001 for sr 15/30/50 (--config.optim.lr=0.001).
  Co-Tuning (tllib): 57.6 / 70.1 / 77.3 / 82.5.
  BSS (tllib): 53.4 / 66.7 / 76.0 / 82.0. DELTA (tllib): 54.8 / 67.3 / 76.3 / 82.3.
  StochNorm (tllib): 54.8 / 66.8 / 75.8 / 82.2. L2-SP: tllib publishes none.
  (tllib's baseline scripts train 20 epochs, lr x0.1 at epoch 12.)
"""

from concept_jax import recipes


def _edit(c, a):
  if a.method == 'concept_tuning':
    c.method.confusing = 199


def get_config(arg=None):
  return recipes.recipe(arg, data='cub200', num_classes=200, edit=_edit)
