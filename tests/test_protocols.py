"""The reported numbers: protocols.summarize and experiment.results_table on hand-made eval histories.

A history is what train.run appends after each evaluation: {'epoch', '<split>_<head>': top-1 %}, heads
'main' and (Concept-Tuning) 'ib', splits 'test', 'val' (data.val_fraction > 0) and the names of
config.extra_eval's data sets (evaluated on their test split).
"""
from concept_jax import experiment, protocols

# Concept-Tuning with a validation split. Built so that every protocol picks a different epoch:
# - official: max over epochs of max(main, IB) on test -> 62, tied at epochs 3 and 4 (the IB head);
# - held-out: best main-head val -> 45, tied at epochs 2 and 3; the IB head's best val (70, epoch 1)
#   and its better test accuracy at epoch 2 (61) must not be used;
# - last: epoch 4's record; the table shows its main head's test accuracy, not the IB head's;
# - an extra evaluation set ('sketch', better than every test accuracy) is never selected on.
HISTORY = [
    {'epoch': 1, 'test_main': 50.0, 'test_ib': 55.0, 'val_main': 40.0, 'val_ib': 70.0, 'sketch_main': 90.0},
    {'epoch': 2, 'test_main': 60.0, 'test_ib': 61.0, 'val_main': 45.0, 'val_ib': 30.0, 'sketch_main': 80.0},
    {'epoch': 3, 'test_main': 58.0, 'test_ib': 62.0, 'val_main': 45.0, 'val_ib': 50.0, 'sketch_main': 85.0},
    {'epoch': 4, 'test_main': 57.0, 'test_ib': 62.0, 'val_main': 44.0, 'val_ib': 50.0, 'sketch_main': 88.0},
]


def _table_rows(summaries):
  """results_table -> header tokens and one token list per run."""
  lines = experiment.results_table(summaries).splitlines()
  return lines[0].split(), [line.split() for line in lines[1:]]


def test_official_takes_the_better_head_and_ties_go_to_the_earliest_epoch():
  s = protocols.summarize(HISTORY)
  assert s['official'] == {'top1': 62.0, 'epoch': 3}


def test_held_out_selects_on_the_main_heads_validation_accuracy():
  s = protocols.summarize(HISTORY)
  assert s['held_out'] == {'top1': 60.0, 'epoch': 2, 'val_top1': 45.0}


def test_last_is_the_last_epochs_record():
  assert protocols.summarize(HISTORY)['last'] == HISTORY[-1]


def test_main_head_better_than_ib_head():
  history = [{'epoch': 1, 'test_main': 70.0, 'test_ib': 40.0},
             {'epoch': 2, 'test_main': 65.0, 'test_ib': 68.0}]
  assert protocols.summarize(history)['official'] == {'top1': 70.0, 'epoch': 1}


def test_without_a_validation_split_there_is_no_held_out_number():
  history = [{k: v for k, v in r.items() if not k.startswith('val_')} for r in HISTORY]
  s = protocols.summarize(history)
  assert 'held_out' not in s
  assert s['official'] == {'top1': 62.0, 'epoch': 3}
  header, rows = _table_rows([dict(s, method='concept_tuning', data='cub200')])
  assert rows == [['concept_tuning', 'concept_tuning', 'cub200', '62.00', 'n/a', '57.00']]


def test_a_single_epoch_is_every_protocols_choice():
  record = {'epoch': 1, 'test_main': 12.5, 'val_main': 20.0}
  assert protocols.summarize([record]) == {'official': {'top1': 12.5, 'epoch': 1}, 'last': record,
                                           'held_out': {'top1': 12.5, 'epoch': 1, 'val_top1': 20.0}}


def test_no_evaluation_yet():
  assert protocols.summarize([]) == {}


def test_results_table_prints_each_protocol_in_its_column():
  summaries = [
      dict(protocols.summarize(HISTORY), run='ct', method='concept_tuning', data='cub200'),
      dict(protocols.summarize([{'epoch': 1, 'test_main': 81.234, 'val_main': 80.0},
                                {'epoch': 2, 'test_main': 80.0, 'val_main': 79.0}]),
           method='erm', data='digits'),                       # a single run: no 'run' name
      {'run': 'stopped', 'preempted_at': 7},                    # a run that has not finished
  ]
  header, rows = _table_rows(summaries)
  assert header == ['run', 'method', 'data', 'official', 'held-out', 'last']
  assert rows[0] == ['ct', 'concept_tuning', 'cub200', '62.00', '60.00', '57.00']
  assert rows[1] == ['erm', 'erm', 'digits', '81.23', '81.23', '80.00']
  assert rows[2][:3] == ['stopped', '(not', 'finished:']
