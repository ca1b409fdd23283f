"""A comparison: settings x sampling rates x seeds run as stages, then one table, chart and sentence.

    python -m concept_jax.compare --config configs/negative_transfer.py --workdir runs/nt
    (python -m concept_jax.main does the same for a config with a `comparison` field)

A comparison config is a stages config (concept_jax/experiment.py: `stages` {run name: full run
config}, `stage_order`, '@run' pretrained references; finished runs are read back from their
results.json, interrupted ones resume, so repeating the command finishes a partial comparison) plus
`comparison`, plain data:

  runs       {run name: {'row': 'ERM from spurious', 'rate': 15, 'seed': 0}}: the table's runs. A row
             is one setting (method and starting point), rate the target sampling rate (%); runs of
             the same (rate, seed) share data and initialisation, so rows are compared per seed.
  reference  the row every gap is taken against: gap = row - reference, paired per (rate, seed).
  metric     dotted path into a run's results.json, e.g. 'last.test_main'.
  rows       optional: the order of rows in the table and chart (default: by their first run in
             stage_order).
  marked     optional rows that are references rather than methods (e.g. ('ERM from clean',
             'scratch')): the chart draws them grey and hatched; `reference` is its line at 0.
  baseline   optional row the sentence measures the methods (rows neither marked nor reference)
             against, paired per seed, e.g. 'ERM from spurious': "At 15% (5 seeds), ERM from spurious
             is 8.1 +- 2.5 points below ERM from clean, and <method> is 3.0 +- 1.9 points above ERM
             from spurious; ...". Without it the sentence lists every row's gap to the reference.
  derived    optional {row: {'of': another row, 'metric': dotted path}}: a row made of the other row's
             runs read at another metric, e.g. Concept-Tuning's information-bottleneck head
             ('last.test_ib') beside its main head.
  sources    optional {run name: {'row': 'spurious', 'seed': 0}}: runs with a diagnostics table of
  source_metrics  {column name: dotted path}, e.g. {'source test': 'last.test_main'} (columns
             in name order, as a ConfigDict keeps them), or ((column name, path), ...) in column order.

Written to WORKDIR: results.csv (one line per run and metric: run, row, rate, seed, metric, value;
an empty value for a run without a result), results.md (per rate: each row's mean +- sample std
(ddof=1) over seeds and its paired gap mean +- std; the source table; the runs left out and why),
results.png (each row's paired gap with error bars, per rate). The table and one sentence computed
from it are printed. A run without a result (not run yet, interrupted, or lacking the metric) is
left out of the numbers and listed; nothing fails on it.
"""
import csv
import dataclasses
import io
import math
import os

from concept_jax import runtime

if __name__ == '__main__':
  runtime.restart_with_malloc_settings()  # before jax and the rest, as main.py does

import jax  # noqa: E402
import numpy as np  # noqa: E402

from concept_jax import experiment, train  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Stat:
  """Mean and sample standard deviation (ddof=1; nan for a single value) of n values."""
  mean: float
  std: float
  n: int


def stat(values) -> Stat | None:
  values = np.asarray(values, np.float64)
  if values.size == 0:
    return None
  return Stat(float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else math.nan,
              int(values.size))


# ---------------------------------------------------------------- checking the config

def check(config) -> dict:
  """config.comparison as a plain dict with its optional fields filled in; ValueError naming what is
  wrong otherwise."""
  if 'comparison' not in config:
    raise ValueError('The config has no `comparison` field: it is not a comparison config. Run a '
                     'single run or a stages config with `python -m concept_jax.main`.')
  c = {'sources': {}, 'source_metrics': {}, 'marked': (), 'baseline': '', 'rows': (), 'derived': {},
       **config.comparison.to_dict()}
  missing = [k for k in ('runs', 'reference', 'metric') if not c.get(k)]
  if missing:
    raise ValueError(f'config.comparison needs {missing} (see concept_jax/compare.py).')
  for field, need in (('runs', ('row', 'rate', 'seed')), ('sources', ('row', 'seed'))):
    not_run = [n for n in c[field] if n not in config.stage_order]
    if not_run:
      raise ValueError(f'config.comparison.{field} names {not_run}, which are not in config.stage_order.')
    incomplete = [n for n, r in c[field].items() if any(k not in r for k in need)]
    if incomplete:
      raise ValueError(f'config.comparison.{field}: {incomplete} lack one of {list(need)}.')
  cells = [(r['row'], r['rate'], r['seed']) for r in c['runs'].values()]
  repeated = sorted({cell for cell in cells if cells.count(cell) > 1})
  if repeated:
    raise ValueError(f'config.comparison.runs has several runs for (row, rate, seed) {repeated}.')
  # A ConfigDict keeps its keys sorted; runs and sources (and so the default row order) follow
  # stage_order instead.
  for field in ('runs', 'sources'):
    c[field] = {n: c[field][n] for n in config.stage_order if n in c[field]}
  rows = list(dict.fromkeys(r['row'] for r in c['runs'].values()))
  bad = {d: spec for d, spec in c['derived'].items() if spec.get('of') not in rows or 'metric' not in spec}
  if bad:
    raise ValueError(f'config.comparison.derived {bad}: each needs an existing row as `of` and a '
                     f'`metric`; rows: {rows}.')
  rows += [d for d in c['derived'] if d not in rows]
  if c['rows'] and sorted(c['rows']) != sorted(rows):
    raise ValueError(f'config.comparison.rows {list(c["rows"])} must list the rows of runs once each: '
                     f'{rows}.')
  c['rows'] = tuple(c['rows'] or rows)
  c['source_metrics'] = dict(c['source_metrics'])
  named = [c['reference'], *c['marked'], *([c['baseline']] if c['baseline'] else [])]
  unknown = [r for r in named if r not in rows]
  if unknown:
    raise ValueError(f'config.comparison names rows {unknown} that no run has; rows: {rows}.')
  return c


# ---------------------------------------------------------------- aggregation (pure)

def lookup(summary: dict, path: str) -> float | None:
  """summary['a']['b'] for path 'a.b'; None when a key is missing or the value is not a number."""
  node = summary
  for key in path.split('.'):
    if not isinstance(node, dict) or key not in node:
      return None
    node = node[key]
  return float(node) if isinstance(node, (int, float)) else None


def collect(comparison: dict, results: dict) -> tuple[list[dict], list[str]]:
  """Run summaries by name (a run absent from `results` has not been run) -> (records, missing).

  records: {'run', 'row', 'rate', 'seed', 'metric', 'value'}, one per run and metric (value None
  without a result; rate None for source runs). missing: 'run name: why', once per such run.
  """
  wanted = [(n, r, r['rate'], comparison['metric']) for n, r in comparison['runs'].items()]
  wanted += [(n, dict(r, row=row), r['rate'], spec['metric'])
             for row, spec in comparison.get('derived', {}).items()
             for n, r in comparison['runs'].items() if r['row'] == spec['of']]
  wanted += [(n, r, None, path) for n, r in comparison['sources'].items()
             for path in comparison['source_metrics'].values()]
  out, missing = [], []
  for name, r, rate, path in wanted:
    summary = results.get(name)
    value = None if summary is None else lookup(summary, path)
    if summary is None:
      missing.append(f'{name}: not run yet')
    elif 'preempted_at' in summary:
      missing.append(f'{name}: interrupted at step {summary["preempted_at"]}')
    elif value is None:
      missing.append(f'{name}: its results.json has no {path}')
    out.append(dict(run=name, row=r['row'], rate=rate, seed=r['seed'], metric=path, value=value))
  return out, list(dict.fromkeys(missing))


def target_table(records: list[dict], comparison: dict) -> dict:
  """{rate: {row: {'value': Stat, 'gap': Stat | None}}}, rates ascending, rows in comparison order.

  gap: row - reference over the seeds both have a value for (None for the reference itself). A row
  with no value at a rate is absent there.
  """
  reference = comparison['reference']
  finished = [r for r in records if r['rate'] is not None and r['value'] is not None]
  table = {}
  for rate in sorted({r['rate'] for r in finished}):
    table[rate] = {}
    for row in comparison['rows']:
      values = [r['value'] for r in finished if r['rate'] == rate and r['row'] == row]
      if values:
        table[rate][row] = {'value': stat(values), 'gap': None if row == reference
                            else paired_difference(records, rate, row, reference)}
  return table


def source_table(records: list[dict], comparison: dict) -> dict:
  """{source row: {column name: Stat}} over seeds; columns as in comparison['source_metrics']."""
  rows = dict.fromkeys(r['row'] for r in comparison['sources'].values())
  return {row: {column: stat([r['value'] for r in records if r['rate'] is None and r['row'] == row
                              and r['metric'] == path and r['value'] is not None])
                for column, path in comparison['source_metrics'].items()}
          for row in rows}


def paired_difference(records: list[dict], rate, row: str, other: str) -> Stat | None:
  """row - other at `rate`, paired over the seeds both have."""
  by = {(r['row'], r['seed']): r['value'] for r in records
        if r['rate'] == rate and r['value'] is not None}
  return stat([v - by[(other, seed)] for (name, seed), v in by.items()
               if name == row and (other, seed) in by])


def _pm(s: Stat | None, signed: bool = False) -> str:
  if s is None:
    return 'n/a'
  mean = f'{s.mean:+.1f}' if signed else f'{s.mean:.1f}'
  return mean if math.isnan(s.std) else f'{mean} +- {s.std:.1f}'


def sentence(table: dict, records: list[dict], comparison: dict) -> str:
  """One sentence from the numbers: per rate, the baseline's gap to the reference and each method's
  paired difference to the baseline (without a baseline: every row's gap to the reference)."""
  reference, baseline = comparison['reference'], comparison['baseline']
  methods = [r for r in comparison['rows'] if r not in (reference, baseline, *comparison['marked'])]
  clauses = []
  for rate, rows in table.items():
    seeds = max(cell['value'].n for cell in rows.values())
    head = f'at {rate}% ({seeds} seed{"s" * (seeds > 1)})'
    base_gap = rows.get(baseline, {}).get('gap')
    if base_gap is None:
      gaps = [f'{row} {_pm(cell["gap"], signed=True)}' for row, cell in rows.items()
              if cell['gap'] is not None]
      if gaps:
        clauses.append(f'{head}, against {reference}: {", ".join(gaps)} points')
      continue
    parts = [f'{head}, {baseline} is {_amount(base_gap)} {_side(base_gap, "below", "above")} {reference}']
    for row in methods:
      d = paired_difference(records, rate, row, baseline)
      if d is not None:
        parts.append(f'{row} is {_amount(d)} {_side(d, "below", "above")} {baseline}')
    clauses.append(', and '.join(parts))
  if not clauses:
    return 'No finished runs yet.'
  text = '; '.join(clauses) + '.'
  return text[0].upper() + text[1:]


def _amount(s: Stat) -> str:
  return _pm(Stat(abs(s.mean), s.std, s.n)) + ' points'


def _side(s: Stat, negative: str, positive: str) -> str:
  return negative if s.mean < 0 else positive


def csv_text(records: list[dict]) -> str:
  out = io.StringIO()
  writer = csv.DictWriter(out, ['run', 'row', 'rate', 'seed', 'metric', 'value'], lineterminator='\n')
  writer.writeheader()
  for r in records:
    writer.writerow({k: '' if v is None else v for k, v in r.items()})
  return out.getvalue()


def markdown(table: dict, sources: dict, missing: list[str], comparison: dict) -> str:
  """results.md: the target table, the source table, the runs left out."""
  reference = comparison['reference']
  lines = [f"`{comparison['metric']}`: mean +- sample std (ddof=1) over seeds; gap: paired per seed, "
           f'row - {reference}.', '']
  if table:
    header, rule = ['| |'], ['|---']
    for rate, rows in table.items():
      seeds = max(cell['value'].n for cell in rows.values())
      header += [f' {rate}% ({seeds} seed{"s" * (seeds > 1)}) |', f' {rate}% gap |']
      rule += ['|---:', '|---:']
    lines += [''.join(header), ''.join(rule) + '|']
    for row in comparison['rows']:
      cells = [f'| {row}{" (reference)" if row == reference else ""} |']
      for rate, rows in table.items():
        seeds = max(cell['value'].n for cell in rows.values())
        cell = rows.get(row)
        if cell is None:
          cells.append(' n/a | n/a |')
          continue
        n = '' if cell['value'].n == seeds else f' (n={cell["value"].n})'
        gap = '0' if row == reference else _pm(cell['gap'], signed=True)
        cells.append(f' {_pm(cell["value"])}{n} | {gap} |')
      lines.append(''.join(cells))
  if sources:
    columns = list(comparison['source_metrics'])
    lines += ['', 'Source models, mean +- std over seeds:', '',
              '| source | ' + ' | '.join(columns) + ' |', '|---' + '|---:' * len(columns) + '|']
    lines += [f'| {row} | ' + ' | '.join(_pm(cells[c]) for c in columns) + ' |'
              for row, cells in sources.items()]
  if missing:
    lines += ['', f'Left out ({len(missing)} without a result; repeat the command to run them):', '']
    lines += [f'- {m}' for m in missing]
  return '\n'.join(lines) + '\n'


def chart(table: dict, comparison: dict, path: str) -> None:
  """PNG: per rate, each row's paired gap to the reference (mean, error bar = std over seeds)."""
  from matplotlib.figure import Figure  # the object API renders with Agg, no pyplot state
  reference, marked = comparison['reference'], comparison['marked']
  rows = [r for r in comparison['rows'] if r != reference]
  width = 0.8 / max(len(rows), 1)
  # tab10 without its grey (the references' colour), then tab20's light shades: 18 distinct rows.
  colours = iter(['tab:blue', 'tab:orange', 'tab:green', 'tab:red', 'tab:purple', 'tab:brown',
                  'tab:pink', 'tab:olive', 'tab:cyan', '#aec7e8', '#ffbb78', '#98df8a', '#ff9896',
                  '#c5b0d5', '#c49c94', '#f7b6d2', '#dbdb8d', '#9edae5'] * 2)
  fig = Figure(figsize=(4.0 + 1.4 * len(table) * max(len(rows), 1) ** 0.5, 4.2), dpi=120)
  ax = fig.add_subplot()
  for i, row in enumerate(rows):
    style = (dict(color='0.75', hatch='//', edgecolor='0.4') if row in marked
             else dict(color=next(colours)))
    points = [(x, cells[row]['gap']) for x, cells in enumerate(table.values())
              if row in cells and cells[row]['gap'] is not None]
    if not points:
      continue
    xs, gaps = zip(*points)
    means = [g.mean for g in gaps]
    errs = [0.0 if math.isnan(g.std) else g.std for g in gaps]
    bars = ax.bar(np.array(xs) + (i - (len(rows) - 1) / 2) * width, means, width, yerr=errs,
                  capsize=3, label=row + (' (reference)' if row in marked else ''), **style)
    ax.bar_label(bars, fmt='%+.1f', fontsize=7, padding=2)
  ax.axhline(0, color='black', linewidth=1, label=f'{reference} (reference, 0)')
  # Room above and below, so that the reference line at 0 never sits on the frame.
  low, high = ax.get_ylim()
  pad = 0.08 * max(high - low, 1.0)
  ax.set_ylim(min(low, 0) - pad, max(high, 0) + pad)
  ax.set_xticks(range(len(table)), [f'{rate}%' for rate in table])
  ax.set_xlabel('target sampling rate')
  ax.set_ylabel(f'paired gap to {reference} (points)')
  derived = ', '.join(f"{row}: {spec['metric']}" for row, spec in comparison['derived'].items())
  ax.set_title(f"{comparison['metric']}{derived and f' ({derived})'}: gap to {reference}, mean +- std "
               'over seeds', fontsize=9)
  ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.01, 1.0))  # beside the bars, never on them
  fig.tight_layout()
  fig.savefig(path)


# ---------------------------------------------------------------- the command

def run(config, workdir: str, runner=train.run, helper: bool = False,
        first_taken=None) -> dict | None:
  """Runs the comparison's unfinished stages, then writes and prints its table (a helper process of
  main's --workers only runs stages: None; first_taken: see experiment.run_stages).

  runner(config, run_dir) -> summary trains one run (train.run; tests pass a fake that writes
  RUN_DIR/results.json as train.run does). Returns {'records', 'missing', 'table', 'sources',
  'sentence'}.
  """
  check(config)
  summaries = {s['run']: s for s in experiment.run_stages(config, workdir, runner, helper=helper,
                                                                first_taken=first_taken)}
  return None if helper else report(config, workdir, summaries)


def report(config, workdir: str, summaries: dict | None = None) -> dict:
  """Writes and prints the table of the runs finished so far, training nothing (summaries: by run
  name; None reads every WORKDIR/<run>/results.json there is), e.g. while a comparison still runs."""
  comparison = check(config)
  if summaries is None:
    summaries = {n: s for n in config.stage_order
                 if (s := experiment.read_results(os.path.join(workdir, n))) is not None}
  records, missing = collect(comparison, summaries)
  table, sources = target_table(records, comparison), source_table(records, comparison)
  text = markdown(table, sources, missing, comparison)
  summary = sentence(table, records, comparison)
  outputs = {'results.csv': csv_text(records), 'results.md': text + '\n' + summary + '\n'}
  if jax.process_index() == 0:
    for name, content in outputs.items():
      with open(os.path.join(workdir, name), 'w') as f:
        f.write(content)
    if table:
      chart(table, comparison, os.path.join(workdir, 'results.png'))
  train.log('\n' + text + '\n' + summary)
  return {'records': records, 'missing': missing, 'table': table, 'sources': sources, 'sentence': summary}


if __name__ == '__main__':
  from concept_jax import main  # the same flags and error handling as `python -m concept_jax.main`
  main.cli(run)
