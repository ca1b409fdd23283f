"""The comparison command (concept_jax/compare.py): resume on a fake runner, aggregation on hand-made
numbers checked against numpy, the files it writes, and the command line."""
import csv
import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time

import ml_collections
import numpy as np
import pytest
from PIL import Image

from concept_jax import compare, experiment, main
from tests.conftest import ROOT, subprocess_env, tiny_config

REFERENCE, SPURIOUS, SCRATCH, CT = 'ERM from clean', 'ERM from spurious', 'scratch', 'CT from spurious'
ROWS = {'clean': REFERENCE, 'spurious': SPURIOUS, 'scratch': SCRATCH, 'ct': CT}
# Hand-made target accuracies, (rate, seed) -> row -> value.
VALUES = {
    (15, 0): {REFERENCE: 90.0, SPURIOUS: 80.0, SCRATCH: 75.0, CT: 85.0},
    (15, 1): {REFERENCE: 92.0, SPURIOUS: 86.0, SCRATCH: 79.0, CT: 88.0},
    (15, 2): {REFERENCE: 91.0, SPURIOUS: 81.0, SCRATCH: 77.0, CT: 87.0},
    (30, 0): {REFERENCE: 93.0, SPURIOUS: 85.0, SCRATCH: 88.0, CT: 90.0},
    (30, 1): {REFERENCE: 92.0, SPURIOUS: 84.0, SCRATCH: 89.0, CT: 86.0},
}
SOURCES = {0: {'test': 99.0, 'shuffled': 40.0}, 1: {'test': 98.0, 'shuffled': 50.0},
           2: {'test': 97.0, 'shuffled': 60.0}}


def _name(key, rate, seed):
  return f's{seed}_sr{rate}_{key}'


def comparison_config(steps=3) -> ml_collections.ConfigDict:
  """Stages for VALUES (each run's fake result is its hand-made value) and sources, as the contract says."""
  stages, runs, sources = {}, {}, {}
  for seed in sorted({s for _, s in VALUES}):
    stages[f's{seed}_source'] = tiny_config('erm', seed=seed)
    sources[f's{seed}_source'] = {'row': 'spurious', 'seed': seed}
  for rate, seed in VALUES:
    for key, row in ROWS.items():
      stage = tiny_config('concept_tuning' if key == 'ct' else 'erm', seed=seed)
      stage.data.sampling_rate = rate
      stage.epochs, stage.iters_per_epoch = 1, steps
      if key != 'scratch':
        stage.pretrained.path = f'@s{seed}_source'
      stages[_name(key, rate, seed)] = stage
      runs[_name(key, rate, seed)] = {'row': row, 'rate': rate, 'seed': seed}
  c = ml_collections.ConfigDict()
  c.stages = stages
  c.stage_order = tuple(stages)
  c.comparison = {'runs': runs, 'reference': REFERENCE, 'marked': (REFERENCE, SCRATCH),
                  'baseline': SPURIOUS, 'metric': 'last.test_main', 'sources': sources,
                  'source_metrics': {'source test': 'last.test_main',
                                     'colours shuffled': 'last.shuffled_main'}}
  return c


def fake_summary(name: str, seed: int) -> dict:
  """What train.run would return for a run of comparison_config(): its hand-made numbers."""
  if name.endswith('_source'):
    last = {'test_main': SOURCES[seed]['test'], 'shuffled_main': SOURCES[seed]['shuffled']}
  else:
    _, rate, key = name.split('_', 2)
    last = {'test_main': VALUES[(int(rate[2:]), seed)][ROWS[key]]}
  return {'last': dict(last, epoch=1), 'method': 'erm', 'data': 'synthetic'}


class FakeRunner:
  """train.run's contract: writes RUN_DIR/results.json and returns it; records what it was asked.
  stop_after: the calls after that many return what train.run returns after SIGTERM."""

  def __init__(self, stop_after=None):
    self.calls, self.stop_after = [], stop_after

  def __call__(self, config, run_dir):
    name = os.path.basename(run_dir)
    self.calls.append((name, config.pretrained.path))
    if self.stop_after is not None and len(self.calls) > self.stop_after:
      return {'preempted_at': 1}
    summary = fake_summary(name, config.seed)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, 'results.json'), 'w') as f:
      json.dump(summary, f)
    return summary


def _numpy_reference(rate, row):
  """(mean, std ddof=1) of the row's values and of its paired gap to the reference at `rate`."""
  cells = [v for (r, _), v in sorted(VALUES.items()) if r == rate]
  value = np.array([c[row] for c in cells])
  gap = value - np.array([c[REFERENCE] for c in cells])
  return value.mean(), value.std(ddof=1), gap.mean(), gap.std(ddof=1)


# ---------------------------------------------------------------- the command on a fake runner

def test_a_partial_comparison_resumes_with_only_the_missing_runs(tmp_path, capsys):
  config = comparison_config()
  first = FakeRunner(stop_after=5)
  report = compare.run(config, str(tmp_path), runner=first)
  order = list(config.stage_order)
  assert [name for name, _ in first.calls] == order[:6]     # stopped at the interrupted sixth run
  assert f'{order[5]}: interrupted at step 1' in report['missing']
  assert f'{order[6]}: not run yet' in report['missing']
  out = capsys.readouterr().out
  assert f'[1/{len(order)}] {order[0]} ... (elapsed ' in out
  assert 'ETA after the first finished run' in out and 'from 1 finished run)' in out

  second = FakeRunner()
  report = compare.run(config, str(tmp_path), runner=second)
  assert [name for name, _ in second.calls] == order[5:]    # the interrupted one again, then the rest
  assert report['missing'] == []
  # '@s0_source' resolves to that run's directory in the workdir.
  assert dict(second.calls)[_name('ct', 30, 1)] == str(tmp_path / 's1_source')
  assert f'[1/{len(order)}] {order[0]}: finished earlier' in capsys.readouterr().out

  third = FakeRunner()
  assert compare.run(config, str(tmp_path), runner=third)['sentence'] == report['sentence']
  assert third.calls == []


def test_a_run_made_with_other_settings_is_refused_not_read_back(tmp_path):
  config = comparison_config()
  compare.run(config, str(tmp_path), runner=FakeRunner())
  changed = comparison_config()
  name = _name('ct', 30, 1)
  changed.stages[name].method.beta = 0.5
  with pytest.raises(ValueError, match=rf'{name} holds a run made with another config '
                                       r'\(method.beta: 1.0 there, 0.5 now\)'):
    compare.run(changed, str(tmp_path), runner=FakeRunner())
  # A field the code gained after a run was made does not count as a change.
  newer = comparison_config()
  for stage in newer.stages.values():
    stage.model.new_option = 'its default'
  compare.run(newer, str(tmp_path), runner=FakeRunner())
  # The unchanged comparison still reads every run back.
  again = FakeRunner()
  compare.run(config, str(tmp_path), runner=again)
  assert again.calls == []


def test_stages_held_by_another_process_are_left_to_it_and_read_back(tmp_path):
  config = comparison_config()
  source, dependent = 's0_source', _name('ct', 15, 0)
  lock = tmp_path / source / experiment.LOCK
  lock.parent.mkdir()
  lock.write_text(f'{socket.gethostname()} {os.getppid()}')  # a live process that is not this one

  def other_process_finishes():
    time.sleep(0.5)
    FakeRunner()(config.stages[source], str(tmp_path / source))
    lock.unlink()

  threading.Thread(target=other_process_finishes).start()
  fake, source_done = FakeRunner(), {}

  def runner(stage, run_dir):
    source_done[os.path.basename(run_dir)] = (tmp_path / source / 'results.json').exists()
    return fake(stage, run_dir)

  summaries = experiment.run_stages(config, str(tmp_path), runner=runner, poll=0.05)
  assert source not in source_done                 # left to the other process
  assert source_done[dependent]                    # started only once its source had finished
  assert not source_done[_name('scratch', 15, 0)]  # a stage with no source did not wait for it
  assert not source_done['s1_source']
  assert [s['run'] for s in summaries] == list(config.stage_order)
  assert all('official' in s or 'last' in s for s in summaries)
  assert not any(p.name == experiment.LOCK for p in tmp_path.rglob('*'))


def test_a_helper_stops_when_what_is_left_waits_for_another_process(tmp_path):
  config = comparison_config()
  lock = tmp_path / 's0_source' / experiment.LOCK
  lock.parent.mkdir()
  lock.write_text(f'{socket.gethostname()} {os.getppid()}')  # held by a live process, never finished
  runner = FakeRunner()
  summaries = experiment.run_stages(config, str(tmp_path), runner=runner, poll=0.05, helper=True)
  ran = {name for name, _ in runner.calls}
  waiting = {n for n in config.stage_order
             if n == 's0_source' or config.stages[n].pretrained.path == '@s0_source'}
  assert ran == set(config.stage_order) - waiting   # everything else, then it stopped
  assert [s['run'] for s in summaries] == [n for n in config.stage_order if n in ran]


def test_first_taken_is_called_once_holding_the_first_stage_or_finding_none(tmp_path):
  """main's --workers releases its helpers there, so the main process runs the first stage."""
  config = comparison_config()
  calls, fake, first = [], FakeRunner(), tmp_path / config.stage_order[0]
  experiment.run_stages(config, str(tmp_path), runner=fake, first_taken=lambda: calls.append(
      (len(fake.calls), (first / experiment.LOCK).read_text().split()[-1])))
  assert calls == [(0, str(os.getpid()))]  # before any run, holding the first stage's lock
  # The first stage unfinished again and held by a live process: the rest is finished.
  (first / experiment.LOCK).write_text(f'{socket.gethostname()} {os.getppid()}')
  (first / 'results.json').unlink()
  calls.clear()
  experiment.run_stages(config, str(tmp_path), runner=fake, helper=True,
                        first_taken=lambda: calls.append('none to take'))
  assert calls == ['none to take']


def test_a_sigterm_that_arrives_as_a_stage_finishes_stops_the_sequence(tmp_path):
  config = comparison_config()
  fake = FakeRunner()

  def runner(stage, run_dir):
    return dict(fake(stage, run_dir), stop_requested=True)   # train.run's answer to a late SIGTERM

  summaries = experiment.run_stages(config, str(tmp_path), runner=runner)
  assert len(fake.calls) == 1 and len(summaries) == 1


def test_a_report_of_a_partial_comparison_trains_nothing(tmp_path):
  config = comparison_config()
  compare.run(config, str(tmp_path), runner=FakeRunner(stop_after=5))
  report = compare.report(config, str(tmp_path))
  assert f'{config.stage_order[6]}: not run yet' in report['missing']
  assert (tmp_path / 'results.md').read_text().startswith('`last.test_main`')
  assert not (tmp_path / config.stage_order[6]).joinpath('results.json').exists()


def test_a_lock_left_by_an_ended_process_is_taken_over(tmp_path):
  config = comparison_config()
  lock = tmp_path / 's0_source' / experiment.LOCK
  lock.parent.mkdir()
  lock.write_text(f'{socket.gethostname()} 999999999')   # no such process
  runner = FakeRunner()
  experiment.run_stages(config, str(tmp_path), runner=runner, poll=0.05)
  assert runner.calls[0][0] == 's0_source'


def test_an_empty_lock_is_being_written_until_it_is_old(tmp_path):
  """A lock is created empty, then its owner is written: another process leaves a young empty lock
  alone; an old one was left by a process that died in between, and is taken over."""
  lock = tmp_path / experiment.LOCK
  lock.write_text('')
  with experiment.StageLock(str(tmp_path)) as taken:
    assert not taken.held and lock.read_text() == ''
  old = time.time() - 2 * experiment.WRITING_S
  os.utime(lock, (old, old))
  with experiment.StageLock(str(tmp_path)) as taken:
    assert taken.held and lock.read_text() == f'{socket.gethostname()} {os.getpid()}'
  assert not lock.exists()


def test_a_one_run_workdir_in_use_by_another_process_is_refused(tmp_path):
  config, workdir = tiny_config('erm'), tmp_path / 'run'
  runner = lambda c, d: {'steps': 4}
  workdir.mkdir()
  (workdir / experiment.LOCK).write_text(f'{socket.gethostname()} {os.getppid()}')  # a live process
  with pytest.raises(ValueError, match=f'is in use by another run .*{os.getppid()}.* another --workdir'):
    experiment.run_alone(config, str(workdir), runner=runner)
  (workdir / experiment.LOCK).unlink()
  assert experiment.run_alone(config, str(workdir), runner=runner) == {'steps': 4}
  assert os.listdir(workdir) == []  # the lock is released
  with pytest.raises(ValueError, match='problem'):  # a bad config: refused before any directory exists
    experiment.run_alone(tiny_config('erm', batch_size=0), str(tmp_path / 'new'), runner=runner)
  assert not (tmp_path / 'new').exists()


def test_files_written_and_printed(tmp_path, capsys):
  config = comparison_config()
  report = compare.run(config, str(tmp_path), runner=FakeRunner())
  out = capsys.readouterr().out

  with open(tmp_path / 'results.csv') as f:
    lines = list(csv.DictReader(f))
  assert len(lines) == len(config.comparison.runs) + 2 * len(config.comparison.sources)
  line = next(r for r in lines if r['run'] == _name('ct', 15, 2))
  assert line == {'run': _name('ct', 15, 2), 'row': CT, 'rate': '15', 'seed': '2',
                  'metric': 'last.test_main', 'value': '87.0'}
  assert {r['value'] for r in lines if r['metric'] == 'last.shuffled_main'} == {'40.0', '50.0', '60.0'}

  md = (tmp_path / 'results.md').read_text()
  mean, std, gap, gap_std = _numpy_reference(15, SPURIOUS)
  assert f'| {SPURIOUS} | {mean:.1f} +- {std:.1f} | {gap:+.1f} +- {gap_std:.1f} |' in md
  assert '| 15% (3 seeds) | 15% gap | 30% (2 seeds) | 30% gap |' in md
  assert f'| {REFERENCE} (reference) | 91.0 +- 1.0 | 0 |' in md
  assert '| source | colours shuffled | source test |' in md  # a ConfigDict sorts the columns
  assert '| spurious | 50.0 +- 10.0 | 98.0 +- 1.0 |' in md
  assert report['sentence'] in md and report['sentence'] in out
  assert md.split('\n\n')[1] in out                         # the table is printed too

  image = Image.open(tmp_path / 'results.png')
  image.load()
  assert image.format == 'PNG' and image.width > 300 and image.height > 300
  pixels = np.asarray(image.convert('L'))
  assert pixels.min() < 100 < pixels.max()                   # something is drawn on the white


# ---------------------------------------------------------------- aggregation on hand-made numbers

def _records():
  """The comparison and the target runs' summaries (the source runs not run)."""
  comparison = compare.check(comparison_config())
  return comparison, {n: fake_summary(n, r['seed']) for n, r in comparison['runs'].items()}


def test_means_sample_stds_and_paired_gaps_match_numpy():
  comparison, results = _records()
  records, missing = compare.collect(comparison, results)
  table = compare.target_table(records, comparison)
  assert list(table) == [15, 30] and list(table[15]) == [REFERENCE, SPURIOUS, SCRATCH, CT]
  for rate in (15, 30):
    for row in (SPURIOUS, SCRATCH, CT):
      mean, std, gap, gap_std = _numpy_reference(rate, row)
      cell = table[rate][row]
      np.testing.assert_allclose([cell['value'].mean, cell['value'].std, cell['gap'].mean,
                                  cell['gap'].std], [mean, std, gap, gap_std])
      assert cell['value'].n == cell['gap'].n == (3 if rate == 15 else 2)
    assert table[rate][REFERENCE]['gap'] is None
  # Sources are not run here: every source metric is reported missing, the table still forms.
  assert missing == [f'{n}: not run yet' for n in comparison['sources']]


def test_a_derived_row_reads_another_rows_runs_at_its_own_metric():
  config = comparison_config()
  config.comparison.derived = {'CT second head': {'of': ROWS['ct'], 'metric': 'last.test_ib'}}
  checked = compare.check(config)
  assert checked['rows'][-1] == 'CT second head'
  results = {}
  for n, r in checked['runs'].items():
    results[n] = fake_summary(n, r['seed'])
    results[n]['last']['test_ib'] = results[n]['last']['test_main'] + (5.0 if r['row'] == ROWS['ct'] else 0)
  results.update({n: fake_summary(n, r['seed']) for n, r in checked['sources'].items()})
  records, missing = compare.collect(checked, results)
  table = compare.target_table(records, checked)
  for rate, rows in table.items():
    ct, second = rows[ROWS['ct']], rows['CT second head']
    assert second['value'].mean == pytest.approx(ct['value'].mean + 5.0)
    assert second['gap'].mean == pytest.approx(ct['gap'].mean + 5.0)
  assert missing == []
  config.comparison.derived = {'x': {'of': 'no such row', 'metric': 'last.test_ib'}}
  with pytest.raises(ValueError, match='derived'):
    compare.check(config)


def test_a_missing_run_is_reported_and_gaps_stay_paired():
  comparison, results = _records()
  del results[_name('spurious', 15, 1)]                                  # not run
  results[_name('ct', 15, 0)] = {'preempted_at': 7}                     # interrupted
  results[_name('scratch', 30, 1)] = {'last': {'epoch': 1}}             # lacks the metric
  records, missing = compare.collect(comparison, results)
  assert {f'{_name("spurious", 15, 1)}: not run yet', f'{_name("ct", 15, 0)}: interrupted at step 7',
          f'{_name("scratch", 30, 1)}: its results.json has no last.test_main'} <= set(missing)
  table = compare.target_table(records, comparison)
  spurious = table[15][SPURIOUS]
  assert spurious['value'].n == 2 and spurious['gap'].n == 2
  np.testing.assert_allclose([spurious['value'].mean, spurious['gap'].mean], [80.5, -10.0])  # seeds 0, 2
  single = table[30][SCRATCH]
  assert single['value'] == compare.Stat(88.0, single['value'].std, 1) and np.isnan(single['value'].std)
  md = compare.markdown(table, {}, missing, comparison)
  assert f'| {SPURIOUS} | 80.5 +- 0.7 (n=2) | -10.0 +- 0.0 |' in md
  assert f'| {SCRATCH} |' in md and '88.0 (n=1) | -5.0 |' in md           # one value: no +- nan
  assert 'nan' not in md
  assert f'- {_name("ct", 15, 0)}: interrupted at step 7' in md
  text = compare.csv_text(records)
  assert f'{_name("spurious", 15, 1)},{SPURIOUS},15,1,last.test_main,\n' in text


def test_the_sentence_comes_from_the_numbers():
  comparison, results = _records()
  records, _ = compare.collect(comparison, results)
  table = compare.target_table(records, comparison)
  sentence = compare.sentence(table, records, comparison)
  gap = _numpy_reference(15, SPURIOUS)
  recovered = np.array([VALUES[(15, s)][CT] - VALUES[(15, s)][SPURIOUS] for s in range(3)])
  assert sentence.startswith(f'At 15% (3 seeds), {SPURIOUS} is {-gap[2]:.1f} +- {gap[3]:.1f} points '
                             f'below {REFERENCE}, and {CT} is {recovered.mean():.1f} +- '
                             f'{recovered.std(ddof=1):.1f} points above {SPURIOUS}; at 30% (2 seeds)')
  # Without a baseline: every row's gap to the reference.
  plain = compare.sentence(table, records, dict(comparison, baseline=''))
  gaps = ', '.join(f'{row} {g:+.1f} +- {sd:.1f}' for row in (SPURIOUS, SCRATCH, CT)
                   for _, _, g, sd in [_numpy_reference(15, row)])
  assert plain.startswith(f'At 15% (3 seeds), against {REFERENCE}: {gaps} points; at 30%')
  assert gaps == f'{SPURIOUS} -8.7 +- 2.3, {SCRATCH} -14.0 +- 1.0, {CT} -4.3 +- 0.6'


@pytest.mark.parametrize('edit, message', [
    (lambda c: c.comparison.update(reference='ERM from nowhere'), "rows \\['ERM from nowhere'\\] that no run"),
    (lambda c: c.comparison.runs.update({'ghost': {'row': CT, 'rate': 15, 'seed': 9}}),
     "runs names \\['ghost'\\], which are not in config.stage_order"),
    (lambda c: c.comparison.runs[_name('ct', 15, 0)].update(seed=1), 'several runs for'),
    (lambda c: c.comparison.update(rows=(REFERENCE, CT)), 'must list the rows of runs once each'),
    (lambda c: c.comparison.update(metric=''), "needs \\['metric'\\]"),
    (lambda c: c.__delitem__('comparison'), 'not a comparison config'),
])
def test_bad_comparison_configs_are_named(edit, message):
  config = comparison_config()
  edit(config)
  with pytest.raises(ValueError, match=message):
    compare.check(config)


def test_source_columns_given_as_pairs_keep_their_order():
  config = comparison_config()
  comparison = config.comparison.to_dict()
  comparison['source_metrics'] = (('source test', 'last.test_main'), ('colours shuffled', 'last.shuffled_main'))
  del config['comparison']
  config.comparison = comparison
  checked = compare.check(config)
  results = {n: fake_summary(n, r['seed']) for n, r in checked['sources'].items()}
  records, _ = compare.collect(checked, results)
  md = compare.markdown({}, compare.source_table(records, checked), [], checked)
  assert '| source | source test | colours shuffled |\n' in md
  assert '| spurious | 98.0 +- 1.0 | 50.0 +- 10.0 |' in md


def test_eta_uses_each_methods_seconds_per_step():
  assert 'ETA after the first finished run' in experiment.progress(5, [], [('erm', 10)])
  timed = [('erm', 100, 10.0), ('concept_tuning', 100, 50.0)]
  # erm: 0.1 s/step, concept_tuning: 0.5 s/step, a method not timed yet: the overall 0.3 s/step.
  todo = [('erm', 300), ('concept_tuning', 60), ('l2sp', 100)]
  assert experiment.progress(125, timed, todo) == 'elapsed 2m05s, ETA 1m30s from 2 finished runs'


# ---------------------------------------------------------------- the command lines

def test_compare_command_line_and_main_dispatch(tmp_path, capsys):
  config_file = tmp_path / 'tiny_comparison.py'
  config_file.write_text(
      'import ml_collections\n'
      'from tests.conftest import tiny_config\n'
      'def get_config():\n'
      '  c = ml_collections.ConfigDict()\n'
      '  c.stages = {"erm": tiny_config("erm", epochs=1),\n'
      '              "smooth": tiny_config("erm", epochs=1, label_smoothing=0.1)}\n'
      '  c.stage_order = ("erm", "smooth")\n'
      '  c.comparison = {"runs": {n: {"row": n, "rate": 100, "seed": 0} for n in c.stages},\n'
      '                  "reference": "erm", "metric": "last.test_main"}\n'
      '  return c\n')
  # `python -m concept_jax.main` (here its run function) dispatches a comparison config to compare.run.
  spec = importlib.util.spec_from_file_location('tiny_comparison', config_file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  main.run(module.get_config(), str(tmp_path / 'run'))
  out = capsys.readouterr().out
  assert '[2/2] smooth ... (elapsed' in out and 'from 1 finished run)' in out
  assert '| smooth |' in out and 'At 100% (1 seed), against erm: smooth ' in out
  assert (tmp_path / 'run' / 'results.png').stat().st_size > 10_000
  # The command line, on the finished comparison: nothing trains, the table comes back.
  done = subprocess.run([sys.executable, '-m', 'concept_jax.compare', '--config', str(config_file),
                         '--workdir', str(tmp_path / 'run')], cwd=ROOT, env=subprocess_env(),
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert '[2/2] smooth: finished earlier' in done.stdout and 'step 1/' not in done.stdout
  assert out[out.index('`last.test_main`'):] in done.stdout


def _contend(stage_dir, inside, rounds, name):
  """One process of the test below: once every process is ready, takes the lock `rounds` times; while
  it holds it, the owner on disk is itself and no other holder has marked `inside`."""
  open(f'{inside}.ready_{name}', 'w').close()
  while not os.path.exists(f'{inside}.go'):
    time.sleep(0.01)
  problems = []
  for _ in range(int(rounds)):
    with experiment.StageLock(stage_dir) as lock:
      if not lock.held:
        continue
      try:
        fd = os.open(inside, os.O_CREAT | os.O_EXCL)
      except FileExistsError:
        problems.append('two processes held the lock at once')
        continue
      if experiment._read(lock.path) != lock.owner:
        problems.append(f'the lock names {experiment._read(lock.path)!r}, not its holder')
      os.close(fd)
      os.remove(inside)
  return problems


def test_processes_racing_for_a_stage_lock_hold_it_one_at_a_time(tmp_path):
  # Fresh processes, not forks of this one: forking a process whose JAX runtime runs threads can hang.
  stage_dir, inside, n = str(tmp_path / 'stage'), str(tmp_path / 'inside'), 6
  code = 'import json, sys; from tests.test_compare import _contend; print(json.dumps(_contend(*sys.argv[1:])))'
  procs = [subprocess.Popen([sys.executable, '-c', code, stage_dir, inside, '300', str(k)], cwd=ROOT,
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for k in range(n)]
  deadline = time.monotonic() + 120
  while len([f for f in os.listdir(tmp_path) if f.startswith('inside.ready_')]) < n:
    assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
    time.sleep(0.05)
  open(f'{inside}.go', 'w').close()  # all start together
  problems = []
  for p in procs:
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-2000:]  # e.g. its lock removed by another process under it
    problems += json.loads(out)
  assert not problems, problems[:5]
  assert os.listdir(stage_dir) == []  # no lock and no owner files left behind
