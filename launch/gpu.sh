#!/usr/bin/env bash
# Runs training on the GPUs of one host, or on several hosts (one process per
# host, each seeing all of its GPUs).
#
#   launch/gpu.sh CONFIG WORKDIR [--config.key=value ...]
#   launch/gpu.sh --gpus 0,1 CONFIG WORKDIR ...          # only GPUs 0 and 1
#   launch/gpu.sh --nodes 2 --node-rank 0 --coordinator 10.0.0.1:8476 \
#       CONFIG WORKDIR ...                               # on host 0
#   launch/gpu.sh --nodes 2 --node-rank 1 --coordinator 10.0.0.1:8476 \
#       CONFIG WORKDIR ...                               # on host 1
#
# Several hosts: run the same command on every host with its own --node-rank;
# --coordinator is host:port of rank 0, reachable from all hosts. WORKDIR must
# be on storage every host sees. --dry-run prints the command instead of
# running it; it runs from the repository root.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
usage: launch/gpu.sh [--dry-run] [--gpus LIST]
         [--nodes N --node-rank I --coordinator HOST:PORT]
         CONFIG WORKDIR [--config.key=value ...]

  --gpus LIST         comma-separated GPU indices (CUDA_VISIBLE_DEVICES);
                      default: all GPUs of the host
  --nodes N           number of hosts, one process each (default 1)
  --node-rank I       this host's index in [0, N)
  --coordinator H:P   host:port of the rank-0 host (N > 1)
EOF
}

gpus=''
nodes=1
rank=''
coordinator=''
while (( $# )); do
  if [[ $1 == --*=* ]]; then
    set -- "${1%%=*}" "${1#*=}" "${@:2}"
  fi
  case $1 in
    --dry-run) DRY_RUN=1; shift ;;
    --gpus) need_value "$@"; gpus=$2; shift 2 ;;
    --nodes) need_value "$@"; nodes=$2; shift 2 ;;
    --node-rank) need_value "$@"; rank=$2; shift 2 ;;
    --coordinator) need_value "$@"; coordinator=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) die_usage "unknown option $1" ;;
    *) break ;;
  esac
done
if (( $# < 2 )); then
  die_usage 'CONFIG and WORKDIR are required'
fi
if [[ -n $gpus && ! $gpus =~ ^[0-9]+(,[0-9]+)*$ ]]; then
  die_usage "--gpus must be comma-separated GPU indices, got '$gpus'"
fi
check_int --nodes "$nodes" 1

cmd=(python -m gendd_jax.main "--config=$1" "--workdir=$2")
if (( 10#$nodes > 1 )); then
  if [[ -z $rank || -z $coordinator ]]; then
    die_usage '--nodes > 1 needs --node-rank and --coordinator'
  fi
  check_int --node-rank "$rank"
  if (( 10#$rank >= 10#$nodes )); then
    die_usage "--node-rank must be below --nodes ($nodes), got $rank"
  fi
  if [[ ! $coordinator =~ ^[^:[:space:]]+:[0-9]+$ \
        && ! $coordinator =~ ^\[[0-9A-Fa-f:]+\]:[0-9]+$ ]]; then
    die_usage "--coordinator must be HOST:PORT, got '$coordinator'"
  fi
  cmd+=(--distributed "--coordinator_address=$coordinator"
        "--num_processes=$((10#$nodes))" "--process_id=$((10#$rank))")
elif [[ -n $rank || -n $coordinator ]]; then
  die_usage '--node-rank and --coordinator need --nodes > 1'
fi
cmd+=("${@:3}")
if [[ -n $gpus ]]; then
  cmd=(env "CUDA_VISIBLE_DEVICES=$gpus" "${cmd[@]}")
fi
cd "$(repo_root)"
run_exec "${cmd[@]}"
