#!/usr/bin/env bash
# concept_jax on a Cloud TPU pod slice: the same command on every TPU VM worker, one process per
# worker with all its chips. jax.distributed reads the coordinator, the process count and ids from
# the TPU environment (--distributed=on), so none are passed.
#
# Usage, from a machine with gcloud (in tmux or screen: the run stops if this ssh session drops):
#   TPU_NAME=my-v4-32 ZONE=us-central2-b launch/tpu_pod.sh --config=configs/cub200.py \
#       --workdir=/mnt/shared/runs/cub200
# Arguments go to `python -m concept_jax.main` unchanged.
#
# Environment: TPU_NAME and ZONE (required); PROJECT (default: gcloud's); REMOTE_DIR, the repository
# on every worker (default: concept_jax, relative to the home directory); PYTHON (default: python3).
# Every worker needs the code at REMOTE_DIR, the requirements with jax[tpu], the data and the
# pretrained weights at the same paths, e.g.
#   gcloud compute tpus tpu-vm ssh $TPU_NAME --zone $ZONE --worker=all \
#       --command "git clone URL concept_jax && pip install -r concept_jax/requirements.txt 'jax[tpu]'"
# --workdir must be a directory every worker sees at the same path (a Filestore/NFS share, or a
# gcsfuse mount of a bucket; gs:// paths themselves are not supported): every process writes its
# part of each Orbax checkpoint there. --config.batch_size (global) must divide by the number of
# TPU devices.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM name}" "${ZONE:?set ZONE to the TPU zone}"
[[ $# -gt 0 ]] || { echo "usage: TPU_NAME=... ZONE=... $0 --config=... --workdir=... [flags]" >&2; exit 2; }
printf -v args ' %q' "$@"
printf -v remote_dir '%q' "${REMOTE_DIR:-concept_jax}"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"} --worker=all \
  --command "cd $remote_dir && PYTHONPATH=. ${PYTHON:-python3} -m concept_jax.main --distributed=on$args"
