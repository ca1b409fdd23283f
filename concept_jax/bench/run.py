"""The command of `python -m concept_jax.bench` (the package docstring is its help): rows -> table, JSON."""
import json

from concept_jax.bench import pipeline, soak, step
from concept_jax.bench.report import environment, table
from concept_jax.bench.settings import parse_args, parse_rows, settings


def main(argv=None) -> dict:
  """Runs the benchmark; returns (and writes to --out) the report."""
  args = parse_args(argv)
  if args.soak:
    rows = [soak.bench_soak(args)]
  elif args.pipeline:
    rows = [pipeline.bench_pipeline(args)]
  else:
    rows = [step.bench_concept_loss(batch, args) if name == 'concept_loss' else
            step.bench_train(name, batch, args) for name, batch in parse_rows(args.rows, args.batch)]
  report = {'environment': environment(), 'settings': settings(args), 'rows': rows}
  print(table(report), flush=True)
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(report, f, indent=2)
    print(f'wrote {args.out}')
  return report
