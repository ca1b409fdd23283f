#!/usr/bin/env bash
# N cooperating JAX processes on one machine: one per GPU (or per group of GPUs), or CPU processes
# that test the multi-process code path on a laptop.
#
# Usage:
#   launch/local.sh N --config=configs/cub200.py --workdir=runs/cub [more concept_jax.main flags]
#   CPU_DEVICES=2 launch/local.sh 2 --config=configs/cub200.py:tiny --workdir=/tmp/tiny   # CPU test
#
# Everything after N goes to `python -m concept_jax.main` unchanged; the script adds
# --coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=i.
#
# Environment (all optional):
#   GPUS_PER_PROCESS=g  process i sees GPUs [i*g, (i+1)*g) through CUDA_VISIBLE_DEVICES (default 1),
#                       numbered within CUDA_VISIBLE_DEVICES when that is set.
#   CPU_DEVICES=d       CPU-only run instead: JAX_PLATFORMS=cpu and d CPU devices per process.
#   PORT=p              coordinator port on 127.0.0.1, process 0's (default: a free port).
#   LOG_DIR=dir         process i writes its stdout and stderr to dir/process_i.log (default: this
#                       terminal; only process 0 prints progress).
#   PYTHON=python3      interpreter with the requirements installed (default: python3).
#
# The global batch (--config.batch_size) is split over all devices of all processes and must divide
# by their number. Every process writes its part of each Orbax checkpoint into the same --workdir
# (any local directory here; a file system shared by all hosts for multi-host runs).
# If one process fails the others are stopped (they would block in their next collective).
# SIGTERM/SIGINT to this script is passed on: every process saves a checkpoint and exits, and the same
# command resumes; a second SIGTERM/SIGINT kills them.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
[[ $# -ge 1 && $1 =~ ^[1-9][0-9]*$ ]] || usage
num_processes=$1
shift

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python3}
port=${PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
gpus_per_process=${GPUS_PER_PROCESS:-1}
[[ -n ${LOG_DIR:-} ]] && mkdir -p "$LOG_DIR"
if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then  # GPUs to share out: those already visible, or 0, 1, ...
  IFS=, read -ra gpus <<< "$CUDA_VISIBLE_DEVICES"
else
  mapfile -t gpus < <(seq 0 $((num_processes * gpus_per_process - 1)))
fi
if [[ -z ${CPU_DEVICES:-} ]] && ((${#gpus[@]} < num_processes * gpus_per_process)); then
  echo "local.sh: $num_processes processes x $gpus_per_process GPUs need $((num_processes * gpus_per_process)) GPUs;" \
       "CUDA_VISIBLE_DEVICES lists ${#gpus[@]}. Lower N or GPUS_PER_PROCESS." >&2
  exit 2
fi

pids=()
for ((i = 0; i < num_processes; i++)); do
  if [[ -n ${CPU_DEVICES:-} ]]; then
    devices=(JAX_PLATFORMS=cpu "JAX_NUM_CPU_DEVICES=$CPU_DEVICES")
  else
    mine=("${gpus[@]:i * gpus_per_process:gpus_per_process}")
    devices=("CUDA_VISIBLE_DEVICES=$(IFS=,; echo "${mine[*]}")")
  fi
  command=(env "${devices[@]}" "$python" -m concept_jax.main --coordinator_address="127.0.0.1:$port"
           --num_processes="$num_processes" --process_id="$i" "$@")
  if [[ -n ${LOG_DIR:-} ]]; then
    "${command[@]}" >"$LOG_DIR/process_$i.log" 2>&1 &
  else
    "${command[@]}" &
  fi
  pids+=($!)
done
echo "local.sh: $num_processes processes (pids ${pids[*]}), coordinator 127.0.0.1:$port" >&2

signal_all() {  # signal_all SIGNAL: to every process still running
  for pid in "${pids[@]}"; do
    [[ -n $pid ]] && kill "-$1" "$pid" 2>/dev/null || true
  done
}
# First SIGTERM/SIGINT: pass it on (each process saves at an agreed step and exits). A second one: kill.
signals=0
on_signal() {
  signals=$((signals + 1))
  if ((signals == 1)); then signal_all TERM; else signal_all KILL; fi
}
trap on_signal TERM INT

# Poll rather than `wait -n`, which older bash (4.2, still on some clusters) lacks.
status=0
running=$num_processes
while ((running > 0)); do
  for i in "${!pids[@]}"; do
    pid=${pids[$i]}
    [[ -z $pid ]] && continue
    kill -0 "$pid" 2>/dev/null && continue
    if wait "$pid"; then rc=0; else rc=$?; fi
    pids[$i]=''
    running=$((running - 1))
    if ((rc != 0 && status == 0)); then
      status=$rc
      echo "local.sh: process $i exited with status $rc; stopping the others." >&2
      signal_all TERM
      sleep 5
      signal_all KILL
    fi
  done
  ((running > 0)) && sleep 1
done
exit "$status"
