"""The reporting protocols, computed from the per-epoch evaluation history.

official: what the official script prints -- the best epoch's max(main head, IB head) top-1, both chosen
  on the test set (optimistic; the IB head samples noise at evaluation, so the max is itself random).
held_out: the epoch with the best main-head accuracy on the validation split held out of the training
  set, and the main head's test accuracy at that epoch (an honest model-selection estimate).
last: the last epoch's record, every evaluated split and head (a fixed budget, no selection at all).
Ties go to the earliest epoch, as the official loop keeps its first best checkpoint.
"""


def summarize(history: list[dict]) -> dict:
  """history: [{'epoch', 'test_main', 'test_ib'?, 'val_main'?, '<extra eval>_main'?, ...}]
  -> {'official': ..., 'held_out': ..., 'last': the last record}."""
  if not history:
    return {}
  heads = lambda r: max(v for k, v in r.items() if k in ('test_main', 'test_ib'))
  best = max(history, key=heads)
  # 'last' keeps every evaluated split and head of the last epoch (test_main, val_main, extra sets).
  summary = {'official': {'top1': heads(best), 'epoch': best['epoch']}, 'last': dict(history[-1])}
  if 'val_main' in history[0]:
    chosen = max(history, key=lambda r: r['val_main'])
    summary['held_out'] = {'top1': chosen['test_main'], 'epoch': chosen['epoch'],
                           'val_top1': chosen['val_main']}
  return summary
