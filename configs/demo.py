"""The embedded default: a complete transfer-learning experiment, offline, in minutes on a laptop CPU.

Run:  python -m concept_jax.main --config configs/demo.py --workdir runs/demo     (or `make demo`)
Data: scikit-learn's 1,797 handwritten 8x8 digits (shipped inside its wheel), upscaled to 64 px so that
the layer4 map is 2x2 and the concept boxes pick quarters of the image.
Stages: (1) pre-train a small ResNet from scratch on digits 0-4 (the "source" task, all examples);
(2) fine-tune it on digits 5-9 at a 15% per-class sampling rate with ERM; (3) the same with
Concept-Tuning; then a table of top-1 under both protocols (README: "Protocols").
Arguments: fast (a few steps per stage, for tests).
Expected: pre-training reaches ~95% on digits 0-4; both fine-tuning runs land well above chance
(20%) on digits 5-9; the figures measured on the CI machine are in README.
"""
import ml_collections

from concept_jax import recipes


def _stage(method: str, classes, sampling_rate: int, steps: int, fast: bool) -> ml_collections.ConfigDict:
  c = recipes.base_config()
  c.data.name = 'digits'
  c.data.classes = classes
  c.data.sampling_rate = sampling_rate
  c.image_size = 64
  c.data.val_fraction = 0.2
  c.model.update(depth=18, width=8, dtype='float32', ib_dim=32)
  c.method = recipes.method_config(method)
  c.batch_size = 32
  c.iters_per_epoch = max(1, steps // 4)
  c.epochs = 4
  c.eval_batch_size = 128
  c.log_every = 25
  c.checkpoint_every = c.iters_per_epoch
  c.optim.update(lr=0.05, schedule='cosine', milestones=(), lr_mults=())
  if method == 'concept_tuning':
    c.method.update(queue_size=8, confusing=4, patch_size=32, image_scale=(0.5, 1.0))
  if fast:
    c.iters_per_epoch, c.epochs, c.log_every = 2, 1, 1
  return c


def get_config(arg=None):
  a = recipes.parse_arg(arg, fast=False)
  source, target = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
  pretrain = _stage('erm', source, 100, steps=240, fast=a.fast)
  pretrain.optim.lr = 0.1
  stages = {'pretrain': pretrain}
  for method in ('erm', 'concept_tuning'):
    stage = _stage(method, target, 15, steps=100, fast=a.fast)
    stage.pretrained.path = '@pretrain'
    # The source head is dropped: fine-tuning starts from the backbone alone.
    stages[method] = stage
  c = ml_collections.ConfigDict()
  c.stages = stages
  c.stage_order = ('pretrain', 'erm', 'concept_tuning')
  return c
