#!/usr/bin/env bash
# Runs one training job on this host (CPU, one GPU or a single TPU VM).
#
#   launch/local.sh CONFIG WORKDIR [--config.key=value ...]
#   launch/local.sh --dry-run configs/digits.py runs/digits
#
# With --dry-run it prints the command instead of running it. The command
# runs from the repository root, so relative paths are relative to it.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  echo 'usage: launch/local.sh [--dry-run] CONFIG WORKDIR' \
    '[--config.key=value ...]'
}

if [[ ${1:-} == --dry-run ]]; then
  DRY_RUN=1
  shift
fi
if (( $# < 2 )); then
  die_usage 'CONFIG and WORKDIR are required'
fi
cmd=(python -m gendd_jax.main "--config=$1" "--workdir=$2" "${@:3}")
cd "$(repo_root)"
run_exec "${cmd[@]}"
