"""StochNorm ("Stochastic Normalization", Kou, You, Long, Wang; NeurIPS 2020), as tllib runs it: plain
cross-entropy fine-tuning with every BatchNorm of the backbone replaced by StochNorm.

The layer is `models/stoch_norm.py`; it is a model option (config.model.norm='stoch', probability
config.model.stoch_norm_p = 0.5, tllib's --prob), so it combines with any method. This name selects it
with ERM's loss, as tllib's examples/task_adaptation/image_classification/stochnorm.py does (weight
decay 5e-4 kept). No extra state: the running statistics are the model's batch_stats.
"""
from concept_jax.methods.erm import ERM


class StochNormERM(ERM):
  name = 'stoch_norm'
  model_options = {'norm': 'stoch'}
