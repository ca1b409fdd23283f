"""Where a benchmarked step spends its time, from the trace `python -m concept_jax.bench --profile=DIR` wrote.

    python -m concept_jax.bench.trace_summary DIR/concept_tuning_b48 [--top 25]

Reads the newest `plugins/profile/*/*.trace.json.gz` under the row's directory (Chrome trace format,
no TensorBoard needed) and the row's `hlo.txt` (the compiled step, written beside it), and prints the
XLA operations that took the most time per step, each with the JAX source operation it came from
(the HLO metadata's op_name), then the time per JAX scope (the op_name's first two parts after the
jit: e.g. `jvp(vmap(Classifier))/backbone` is the patch passes' forward, `transpose(...)` a backward,
`jvp()/while` the Sinkhorn loop) and per kind of XLA operation (fusion, convolution, copy, ...).

Only events that name an HLO operation count. Where the trace has device tracks (GPU, TPU), only those
count, so a kernel is not counted again through the host thread that launched it.
"""
import argparse
import collections
import glob
import gzip
import json
import os
import re

TRACED_STEPS = 3  # bench traces this many steps of each row
_COMPUTATION = re.compile(r'^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$')
_OP = re.compile(r'^\s*(ROOT\s+)?%?([\w.\-]+)\s*=')
_OP_NAME = re.compile(r'metadata=\{[^}]*op_name="([^"]*)"')
_CALLS = re.compile(r'calls=%?([\w.\-]+)')


def op_names(hlo_text: str) -> dict:
  """HLO operation name -> the JAX op_name in its metadata.

  A fusion XLA made without metadata of its own takes that of its fused computation's root (or, if
  the root has none, of the computation's first operation that has one).
  """
  names, calls, computation_names, computation = {}, {}, {}, None
  for line in hlo_text.splitlines():
    op = _OP.match(line)
    if op is None:
      header = _COMPUTATION.match(line)
      if header:
        computation = header.group(1)
      continue
    name, op_name, callee = op.group(2), _OP_NAME.search(line), _CALLS.search(line)
    if op_name:
      names[name] = op_name.group(1)
      if computation and (op.group(1) or computation not in computation_names):
        computation_names[computation] = op_name.group(1)
    elif callee:
      calls[name] = callee.group(1)
  for name, callee in calls.items():
    if callee in computation_names:
      names[name] = computation_names[callee]
  return names


def op_times(trace: dict) -> collections.Counter:
  """HLO operation name -> total exclusive duration (microseconds) over the trace.

  Exclusive: an operation that runs others inside it (a while loop or call on the CPU, whose body's
  operations are traced too) keeps only the time none of them covers, so nothing counts twice.
  """
  events = trace.get('traceEvents', [])
  processes = {e['pid']: e.get('args', {}).get('name', '') for e in events
               if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  devices = {pid for pid, name in processes.items() if name.startswith('/device:')}
  tracks = collections.defaultdict(list)
  for e in events:
    op = e.get('args', {}).get('hlo_op')
    if e.get('ph') == 'X' and op and (not devices or e.get('pid') in devices):
      tracks[(e.get('pid'), e.get('tid'))].append((float(e['ts']), float(e.get('dur', 0.0)), op))
  times = collections.Counter()
  for track in tracks.values():
    track.sort(key=lambda t: (t[0], -t[1]))
    stack = []  # (end, op) of the operations enclosing the current one
    for start, dur, op in track:
      while stack and stack[-1][0] <= start:
        stack.pop()
      if stack:
        times[stack[-1][1]] -= dur
      times[op] += dur
      stack.append((start + dur, op))
  return times


def newest_trace(row_dir: str) -> str:
  paths = glob.glob(os.path.join(row_dir, 'plugins', 'profile', '*', '*.trace.json.gz'))
  if not paths:
    raise FileNotFoundError(f'No plugins/profile/*/*.trace.json.gz under {row_dir}: pass the directory '
                            'of one row, as written by `python -m concept_jax.bench --profile=DIR` '
                            '(DIR/<method>_b<batch>).')
  return max(paths, key=os.path.getmtime)


def summarize(row_dir: str, top: int = 25) -> str:
  """The printed summary of one row's trace (milliseconds per step)."""
  with gzip.open(newest_trace(row_dir), 'rt') as f:
    times = op_times(json.load(f))
  hlo_path = os.path.join(row_dir, 'hlo.txt')
  names = {}
  if os.path.exists(hlo_path):
    with open(hlo_path) as f:
      names = op_names(f.read())
  per_step = lambda us: us / TRACED_STEPS / 1e3
  total = sum(times.values())
  lines = [f'{row_dir}: {per_step(total):.3f} ms per step in {len(times)} HLO operations '
           f'(mean over {TRACED_STEPS} traced steps)', '', f'{"ms/step":>9} {"share":>6}  operation  <- JAX op']
  for op, us in times.most_common(top):
    lines.append(f'{per_step(us):9.3f} {us / total:6.1%}  {op}  <- {names.get(op) or "(no metadata)"}')
  scopes, kinds = collections.Counter(), collections.Counter()
  for op, us in times.items():
    scopes[scope(names.get(op, ''))] += us
    kinds[op.split('.')[0]] += us
  for title, counter in (('JAX scope', scopes), ('XLA operation kind', kinds)):
    lines += ['', f'{"ms/step":>9} {"share":>6}  {title}']
    lines += [f'{per_step(us):9.3f} {us / total:6.1%}  {key}' for key, us in counter.most_common(top)]
  return '\n'.join(lines)


def scope(op_name: str) -> str:
  """'jit(step_fn)/jvp(vmap(Classifier))/backbone/layer3_1/conv2/...' -> 'jvp(vmap(Classifier))/backbone';
  '(no metadata)' for operations XLA created without one."""
  parts = op_name.split('/')
  return '/'.join(parts[1:3]) if len(parts) > 1 else (op_name or '(no metadata)')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('row_dir', help='DIR/<row> as written by bench --profile=DIR')
  parser.add_argument('--top', type=int, default=25, help='operations listed')
  args = parser.parse_args(argv)
  print(summarize(args.row_dir, args.top))


if __name__ == '__main__':
  main()
