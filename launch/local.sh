#!/usr/bin/env bash
# Runs one training job on this host (CPU, one GPU or a single TPU VM).
#
#   launch/local.sh CONFIG WORKDIR [--config.key=value ...]
#   launch/local.sh --dry-run configs/digits.py runs/digits
#
# With --dry-run it prints the command instead of running it.
set -euo pipefail
dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then
  dry_run=1
  shift
fi
if [[ $# -lt 2 ]]; then
  echo "usage: $0 [--dry-run] CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
config=$1
workdir=$2
shift 2
cmd=(python -m gendd_jax.main "--config=${config}" "--workdir=${workdir}" "$@")
if (( dry_run )); then
  printf '%q ' "${cmd[@]}"
  echo
else
  cd "$(dirname "$0")/.."
  exec "${cmd[@]}"
fi
