#!/usr/bin/env bash
# Reruns a training command until it succeeds: after a preemption or crash the
# same command resumes from the latest checkpoint in its workdir.
#
#   launch/resume.sh [options] [--] COMMAND [ARG ...]
#   launch/resume.sh -- launch/gpu.sh configs/digits.py runs/digits
#   launch/resume.sh --tpu gendd --zone us-central2-b -- \
#       launch/tpu_vm.sh train CONFIG gs://BUCKET/runs/NAME
#
# Stops at once on exit status 0 (done) and on 2, 4, 5 and 6 (a user error, a
# changed config, a busy workdir, a checkpoint that does not fit: a rerun
# would fail the same way), and after --max-attempts runs, exiting with the last
# status; waits --backoff seconds between runs. With --tpu, each attempt first
# asks for the TPU VM's state; a PREEMPTED or TERMINATED VM is deleted,
# created and set up again (a missing one is created and set up) with
# launch/tpu_vm.sh, which also reads its other settings (TPU_ACCELERATOR,
# TPU_SPOT, ...) from the environment. TPU_NAME and TPU_ZONE are exported
# to COMMAND. --dry-run prints the commands of one attempt.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
usage: launch/resume.sh [--dry-run] [--max-attempts N] [--backoff SECONDS]
         [--tpu NAME --zone ZONE] [--] COMMAND [ARG ...]

  --max-attempts N     runs of COMMAND at most (default 20)
  --backoff SECONDS    wait between runs (default 60)
  --tpu NAME           recreate and set up the TPU VM NAME when preempted
  --zone ZONE          its zone (needed with --tpu)
  --dry-run            print the commands of one attempt
EOF
}

max_attempts=20
backoff=60
tpu=''
zone=''
while (( $# )); do
  case $1 in
    --max-attempts|--backoff|--tpu|--zone) ;;
    --max-attempts=*|--backoff=*|--tpu=*|--zone=*)
      set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;
  esac
  case $1 in
    --dry-run) DRY_RUN=1; shift ;;
    --max-attempts) need_value "$@"; max_attempts=$2; shift 2 ;;
    --backoff) need_value "$@"; backoff=$2; shift 2 ;;
    --tpu) need_value "$@"; tpu=$2; shift 2 ;;
    --zone) need_value "$@"; zone=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) die_usage "unknown option $1" ;;
    *) break ;;
  esac
done
if (( $# == 0 )); then
  die_usage 'COMMAND is required'
fi
check_int --max-attempts "$max_attempts" 1
check_seconds --backoff "$backoff"
if [[ -n $tpu && -z $zone ]] || [[ -z $tpu && -n $zone ]]; then
  die_usage '--tpu and --zone go together'
fi

tpu_vm_sh=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/tpu_vm.sh
if [[ -n $tpu ]]; then
  tpu_cmd=("$tpu_vm_sh" --name "$tpu" --zone "$zone")
  export TPU_NAME=$tpu TPU_ZONE=$zone
fi

if is_dry_run; then
  if [[ -n $tpu ]]; then
    print_cmd "${tpu_cmd[@]}" status
    echo '# if that prints PREEMPTED or TERMINATED (no VM: only create, setup):'
    print_cmd "${tpu_cmd[@]}" delete
    print_cmd "${tpu_cmd[@]}" create
    print_cmd "${tpu_cmd[@]}" setup
    echo '# then:'
  fi
  print_cmd "$@"
  exit 0
fi

# Set when the TPU VM was (being) created and not yet set up.
needs_setup=0

# Recreates the TPU VM when it was preempted or is missing, and sets it up
# when it was created; returns non-zero when a step fails.
ensure_tpu_vm() {
  local state
  state=$("${tpu_cmd[@]}" status) || state=''
  case $state in
    READY) ;;
    PREEMPTED|TERMINATED)
      echo "resume: TPU VM $tpu is $state; recreating it" >&2
      "${tpu_cmd[@]}" delete || return
      needs_setup=1
      "${tpu_cmd[@]}" create || return ;;
    '')
      echo "resume: no TPU VM $tpu; creating it" >&2
      needs_setup=1
      "${tpu_cmd[@]}" create || return ;;
    *)
      echo "resume: TPU VM $tpu is $state; trying anyway" >&2
      return 0 ;;
  esac
  if (( needs_setup )); then
    "${tpu_cmd[@]}" setup || return
    needs_setup=0
  fi
}

status=1
for (( attempt = 1; attempt <= 10#$max_attempts; attempt++ )); do
  if (( attempt > 1 )); then
    echo "resume: exit status $status; attempt $attempt of" \
      "$max_attempts in ${backoff}s" >&2
    sleep "$backoff"
  fi
  status=0
  if [[ -n $tpu ]]; then
    ensure_tpu_vm || status=$?
  fi
  if (( status == 0 )); then
    "$@" || status=$?
  fi
  case $status in
    0) exit 0 ;;
    2|4|5|6)
      echo "resume: exit status $status (a user error, a changed config," \
        'a busy workdir or a checkpoint that does not fit); not retrying' >&2
      exit "$status" ;;
  esac
done
echo "resume: giving up after $max_attempts attempts (exit status $status)" >&2
exit "$status"
