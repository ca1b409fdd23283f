"""The two reporting protocols, computed from the per-epoch evaluation history.

official: what the official script prints -- the best epoch's max(main head, IB head) top-1, both chosen
  on the test set (optimistic; the IB head samples noise at evaluation, so the max is itself random).
held_out: the epoch with the best main-head accuracy on the validation split held out of the training
  set, and the main head's test accuracy at that epoch (an honest model-selection estimate).
"""


def summarize(history: list[dict]) -> dict:
  """history: [{'epoch', 'test_main', 'test_ib'?, 'val_main'?, ...}] -> {'official': ..., 'held_out': ...}."""
  if not history:
    return {}
  heads = lambda r: max(v for k, v in r.items() if k.startswith('test_'))
  best = max(history, key=heads)
  summary = {'official': {'top1': heads(best), 'epoch': best['epoch']},
             'last': {'test_main': history[-1]['test_main'], 'epoch': history[-1]['epoch']}}
  if 'val_main' in history[0]:
    chosen = max(history, key=lambda r: r['val_main'])
    summary['held_out'] = {'top1': chosen['test_main'], 'epoch': chosen['epoch'],
                           'val_top1': chosen['val_main']}
  return summary
