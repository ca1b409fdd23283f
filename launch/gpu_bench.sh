#!/usr/bin/env bash
# GPU speed rows (../shared/docs/reference.md): ERM at batch 128 and 48, Concept-Tuning and its concept
# loss alone at the CUB recipe's shapes (ResNet-50, 224 px, 200 classes, K 40, confusing 199, bfloat16),
# on synthetic data.
#
#   bash launch/gpu_bench.sh                 # from the repository root; results in $OUT or ./bench_out
#
# For a machine with jax, flax, optax and orbax but no TensorFlow or ml_collections: pure-Python wheels
# found in .whl/ (ml_collections, tqdm; fetch them with `python3 -m pip download --no-deps
# --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux2014_x86_64
# -d .whl ml_collections==1.1.0 tqdm`) are installed into $SITE and put on PYTHONPATH first.
# Each row runs in its own process, so each peak-memory figure is that row's alone, and a row that
# fails or runs past $ROW_TIMEOUT seconds leaves the others' results intact.
# With PROFILE=1 (the default) each row also traces 3 steps into $OUT/profile/<row> and writes
# $OUT/<row>_trace.txt (python -m concept_jax.bench.trace_summary): time per XLA operation, JAX scope
# and operation kind, to see where a step's time goes without TensorBoard.
# Environment: OUT (results folder), STEPS (timed steps, 20), WARMUP (3), ROW_TIMEOUT (300), PROFILE,
# ROWS (default 'erm:128 erm:48 concept_tuning:48 concept_loss:48'), BENCH_ARGS (extra flags, e.g. --preset=cpu).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR="${OUT:-bench_out}"
SITE="${SITE:-/tmp/site}"
STEPS="${STEPS:-20}"
WARMUP="${WARMUP:-3}"
ROW_TIMEOUT="${ROW_TIMEOUT:-300}"
ROWS="${ROWS:-erm:128 erm:48 concept_tuning:48 concept_loss:48}"
mkdir -p "$OUT_DIR"
profile=()
[[ ${PROFILE:-1} == 1 ]] && profile=(--profile="$OUT_DIR/profile")

shopt -s nullglob
wheels=(.whl/*.whl)
if (( ${#wheels[@]} )); then
  python3 -m pip install -q --upgrade --no-index --no-deps --target "$SITE" "${wheels[@]}" || exit 1
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
  python3 -c 'import jax, flax, optax, ml_collections; print("jax", jax.__version__, "flax",
flax.__version__, "optax", optax.__version__, "devices", jax.devices())'
} 2>&1 | tee "$OUT_DIR/environment.txt"

status=0
for row in $ROWS; do
  name="${row//:/_b}"
  echo "=== $row (timeout ${ROW_TIMEOUT}s)"
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
  timeout "$ROW_TIMEOUT" python3 -m concept_jax.bench --rows="$row" --steps="$STEPS" \
      --warmup="$WARMUP" --out="$OUT_DIR/$name.json" "${profile[@]}" ${BENCH_ARGS:-} 2>&1 \
      | tee "$OUT_DIR/$name.log"
  rc=${PIPESTATUS[0]}
  if (( rc )); then
    echo "=== $row FAILED (exit $rc; 124 = timed out); see $OUT_DIR/$name.log"
    status=1
  elif (( ${#profile[@]} )); then
    python3 -m concept_jax.bench.trace_summary "$OUT_DIR/profile/$name" > "$OUT_DIR/${name}_trace.txt" 2>&1
    head -n 12 "$OUT_DIR/${name}_trace.txt"
  fi
done

# One report with every row that finished (environment and settings of the first).
python3 - "$OUT_DIR" $ROWS <<'EOF'
import json, os, sys
out, rows = sys.argv[1], sys.argv[2:]
reports = []
for row in rows:
  path = os.path.join(out, row.replace(':', '_b') + '.json')
  if os.path.exists(path):
    with open(path) as f:
      reports.append(json.load(f))
if reports:
  merged = dict(reports[0], rows=[r for rep in reports for r in rep['rows']])
  merged['settings'] = dict(merged['settings'], rows=' '.join(rows))
  with open(os.path.join(out, 'bench.json'), 'w') as f:
    json.dump(merged, f, indent=2)
  from concept_jax.bench.report import table
  print(table(merged))
print(f'{len(reports)} of {len(rows)} rows in {out}/bench.json')
EOF
exit $status
