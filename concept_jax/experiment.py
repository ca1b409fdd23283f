"""A run of one config, or of a sequence of stages (pre-train, then fine-tune with several methods).

A config with `stages` (a dict of full configs) and `stage_order` runs each stage in WORKDIR/<stage>;
a stage whose pretrained.path is '@NAME' starts from stage NAME's final checkpoint. A finished stage is
skipped on a rerun (its results.json is read back), an interrupted one resumes.
"""
import json
import os

from concept_jax import train


def run(config, workdir: str) -> list[dict]:
  """Runs config (or its stages); prints and returns one summary per run."""
  if 'stages' not in config:
    summaries = [train.run(config, workdir)]
  else:
    summaries = [dict(_run_stage(config.stages[name], os.path.join(workdir, name), workdir), run=name)
                 for name in config.stage_order]
  train.log(results_table(summaries))
  return summaries


def _run_stage(stage, stage_dir: str, workdir: str) -> dict:
  results = os.path.join(stage_dir, 'results.json')
  if os.path.exists(results):
    with open(results) as f:
      return json.load(f)
  if stage.pretrained.path.startswith('@'):
    stage = stage.copy_and_resolve_references()
    stage.pretrained.path = os.path.join(workdir, stage.pretrained.path[1:])
  return train.run(stage, stage_dir)


def results_table(summaries: list[dict]) -> str:
  """Top-1 (%) under both protocols, one row per run."""
  lines = [f"{'run':<16} {'method':<16} {'data':<14} {'official':>9} {'held-out':>9} {'last':>7}"]
  for s in summaries:
    run = s.get('run', s.get('method', '?'))
    if 'official' not in s:
      lines.append(f"{run:<16} (not finished: {s})")
      continue
    held = s.get('held_out', {}).get('top1')
    lines.append(f"{run:<16} {s['method']:<16} {s['data']:<14} {s['official']['top1']:>9.2f} "
                 f"{'n/a' if held is None else f'{held:.2f}':>9} {s['last']['test_main']:>7.2f}")
  return '\n'.join(lines)
