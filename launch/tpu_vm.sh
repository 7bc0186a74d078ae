#!/usr/bin/env bash
# Cloud TPU VMs (one host or a pod slice): create one, install this
# repository on every worker, train on all workers, check, delete.
#
#   launch/tpu_vm.sh --accelerator v4-32 --spot create
#   launch/tpu_vm.sh setup
#   launch/tpu_vm.sh --bucket my-bucket train \
#       configs/cifar100_teacher.py:resnet32x4 gs://my-bucket/runs/r32x4
#   launch/tpu_vm.sh status     # READY, PREEMPTED, ... (gcloud's state)
#   launch/tpu_vm.sh delete
#
# `train` runs `python -m gendd_jax.main --distributed` on all workers at
# once (JAX finds the other workers itself) and returns the first non-zero
# worker status. A rerun of the same `train` resumes from the latest
# checkpoint in WORKDIR, which must be a gs:// path on a multi-host slice.
# --dry-run prints the commands instead of running them; they run from the
# repository root.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
usage: launch/tpu_vm.sh [options] create|setup|status|delete
       launch/tpu_vm.sh [options] train CONFIG WORKDIR [--config.key=value ...]

subcommands:
  create    create the TPU VM (gcloud compute tpus tpu-vm create)
  setup     copy this checkout (git archive HEAD; or clone --repo) to every
            worker into ~/gendd-jax and install requirements.txt and
            jax[tpu] into ~/gendd-jax/.venv (Python 3.11, via uv)
  train     run the trainer on all workers with --distributed
  status    print the VM's state (READY, PREEMPTED, ...)
  delete    delete the VM

options (environment variable, default):
  --name NAME          TPU_NAME, gendd
  --zone ZONE          TPU_ZONE, us-central2-b
  --accelerator TYPE   TPU_ACCELERATOR, v4-8 (e.g. v4-32, v5litepod-16, v6e-8)
  --version RUNTIME    TPU_VERSION, the usual JAX runtime of the accelerator
                       (tpu-ubuntu2204-base for v2-v4, v2-alpha-tpuv5-lite,
                       v2-alpha-tpuv5, v2-alpha-tpuv6e)
  --project PROJECT    TPU_PROJECT, gcloud's configured project
  --spot               TPU_SPOT=1, a Spot VM (create)
  --preemptible        TPU_PREEMPTIBLE=1, a preemptible VM (create)
  --bucket BUCKET      TPU_BUCKET; train reads TFDS data from gs://BUCKET/tfds
  --data-dir DIR       TPU_DATA_DIR, TFDS data dir passed to the trainer
                       (default gs://BUCKET/tfds when a bucket is set)
  --repo URL           TPU_REPO; setup clones URL instead of copying HEAD
  --ref REF            TPU_REF, branch or tag to clone
  --dry-run            print the commands instead of running them
EOF
}

name=${TPU_NAME:-gendd}
zone=${TPU_ZONE:-us-central2-b}
accelerator=${TPU_ACCELERATOR:-v4-8}
version=${TPU_VERSION:-}
project=${TPU_PROJECT:-}
spot=${TPU_SPOT:-0}
preemptible=${TPU_PREEMPTIBLE:-0}
bucket=${TPU_BUCKET:-}
data_dir=${TPU_DATA_DIR:-}
repo_url=${TPU_REPO:-}
repo_ref=${TPU_REF:-}

sub=''
while (( $# )); do
  case $1 in
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
    --name) need_value "$@"; name=$2; shift 2 ;;
    --zone) need_value "$@"; zone=$2; shift 2 ;;
    --accelerator) need_value "$@"; accelerator=$2; shift 2 ;;
    --version) need_value "$@"; version=$2; shift 2 ;;
    --project) need_value "$@"; project=$2; shift 2 ;;
    --spot) spot=1; shift ;;
    --preemptible) preemptible=1; shift ;;
    --bucket) need_value "$@"; bucket=$2; shift 2 ;;
    --data-dir) need_value "$@"; data_dir=$2; shift 2 ;;
    --repo) need_value "$@"; repo_url=$2; shift 2 ;;
    --ref) need_value "$@"; repo_ref=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) die_usage "unknown option $1" ;;
    *)
      if [[ -z $sub ]]; then
        sub=$1
        shift
      elif [[ $sub == train ]]; then
        break  # CONFIG WORKDIR [overrides]
      else
        die_usage "unexpected argument '$1'"
      fi ;;
  esac
done

case $sub in
  create|setup|status|delete) ;;
  train)
    if (( $# < 2 )); then
      die_usage 'train needs CONFIG and WORKDIR'
    fi ;;
  '') die_usage 'a subcommand is required' ;;
  *) die_usage "unknown subcommand '$sub'" ;;
esac
if [[ ! $name =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]]; then
  die_usage "--name must be lowercase letters, digits and '-', got '$name'"
fi
if [[ ! $zone =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]]; then
  die_usage "--zone must look like us-central2-b, got '$zone'"
fi
if [[ ! $accelerator =~ ^v[0-9][a-z0-9]*-([0-9]+)$ ]]; then
  die_usage "--accelerator must look like v4-32, got '$accelerator'"
fi
chips=${BASH_REMATCH[1]}
if [[ $spot != 0 && $preemptible != 0 ]]; then
  die_usage '--spot and --preemptible exclude each other'
fi
bucket=${bucket#gs://}
bucket=${bucket%/}
if [[ -z $data_dir && -n $bucket ]]; then
  data_dir=gs://$bucket/tfds
fi
if [[ -z $version ]]; then
  case $accelerator in
    v6e-*) version=v2-alpha-tpuv6e ;;
    v5p-*) version=v2-alpha-tpuv5 ;;
    v5litepod-*|v5e-*) version=v2-alpha-tpuv5-lite ;;
    *) version=tpu-ubuntu2204-base ;;
  esac
fi

# Flags every gcloud command takes.
where=("--zone=$zone")
if [[ -n $project ]]; then
  where+=("--project=$project")
fi
tpu_vm=(gcloud compute tpus tpu-vm)
# The folder on each worker, relative to the home directory.
remote_dir=gendd-jax

# Runs the shell command $1 on every worker.
on_all_workers() {
  run "${tpu_vm[@]}" ssh "$name" "${where[@]}" --worker=all "--command=$1"
}

# Prints $@ quoted for the remote shell, on one line.
quote_words() {
  local line
  printf -v line '%q ' "$@"
  printf '%s' "${line% }"
}

cd "$(repo_root)"
case $sub in
  create)
    cmd=("${tpu_vm[@]}" create "$name" "${where[@]}"
         "--accelerator-type=$accelerator" "--version=$version")
    if [[ $spot != 0 ]]; then
      cmd+=(--spot)
    elif [[ $preemptible != 0 ]]; then
      cmd+=(--preemptible)
    fi
    run "${cmd[@]}" ;;
  setup)
    jax_version=$(sed -n 's/^jax==\([0-9][0-9.]*\).*/\1/p' requirements.txt)
    if [[ -z $jax_version ]]; then
      die 'requirements.txt pins no jax version (jax==X.Y.Z)'
    fi
    if [[ -n $repo_url ]]; then
      clone=(git clone --depth 1)
      if [[ -n $repo_ref ]]; then
        clone+=(--branch "$repo_ref")
      fi
      fetch="rm -rf $remote_dir && $(quote_words "${clone[@]}" "$repo_url") \
$remote_dir"
    else
      if [[ -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]]
      then
        echo 'warning: uncommitted changes are not copied' \
          '(git archive HEAD)' >&2
      fi
      tarball=${TMPDIR:-/tmp}/gendd-jax-$name.tar.gz
      run git archive --format=tar.gz "--output=$tarball" HEAD
      run "${tpu_vm[@]}" scp "$tarball" "$name:$remote_dir.tar.gz" \
        "${where[@]}" --worker=all
      fetch="rm -rf $remote_dir && mkdir $remote_dir && \
tar -xzf $remote_dir.tar.gz -C $remote_dir"
    fi
    on_all_workers "$fetch && python3 -m pip install --user --quiet uv && \
cd $remote_dir && python3 -m uv venv --quiet --python 3.11 .venv && \
python3 -m uv pip install --quiet --python .venv/bin/python \
-r requirements.txt $(quote_words "jax[tpu]==$jax_version")" ;;
  train)
    if (( 10#$chips > 8 )) && [[ $2 != gs://* ]]; then
      echo "warning: $accelerator has several workers; WORKDIR $2 should be" \
        'a gs:// path that all of them share' >&2
    fi
    args=(-m gendd_jax.main "--config=$1" "--workdir=$2" --distributed)
    if [[ -n $data_dir ]]; then
      args+=("--config.data.data_dir=$data_dir")
    fi
    args+=("${@:3}")
    on_all_workers "cd $remote_dir && .venv/bin/python $(quote_words \
"${args[@]}")" ;;
  status)
    run "${tpu_vm[@]}" describe "$name" "${where[@]}" '--format=value(state)' ;;
  delete)
    run "${tpu_vm[@]}" delete "$name" "${where[@]}" --quiet ;;
esac
