#!/usr/bin/env bash
# Create, provision, run clipup-train on, watch and delete a Cloud TPU VM pod slice.
#
#   tpu/pod.sh create  --name clipup --zone us-central2-b --accelerator v4-64
#   tpu/pod.sh install --name clipup --zone us-central2-b
#   tpu/pod.sh launch  --name clipup --zone us-central2-b --config experiments/clipup_b16.py \
#                      --workdir gs://my-bucket/runs/clipup_b16 --extra "--config.init.checkpoint=gs://my-bucket/ckpt/b16"
#   tpu/pod.sh logs    --name clipup --zone us-central2-b [--worker all]
#   tpu/pod.sh delete  --name clipup --zone us-central2-b
#
# Every subcommand accepts --dry-run: print each command (one a line, prefixed "+ ") and run nothing.
# See tpu/README.md for a full walk-through.
set -euo pipefail

PROG="pod.sh"
SUBCOMMANDS="create|install|launch|logs|delete"

usage() {
  cat <<EOF
usage: $PROG {$SUBCOMMANDS} [options]

Subcommands:
  create    create the TPU VM pod slice (gcloud compute tpus tpu-vm create)
  install   copy this working tree to every worker, make a venv, pip install -e . and jax[tpu]
  launch    start clipup-train on every worker under nohup, output to the log file
  logs      tail the log file on one worker (default 0) or all
  delete    delete the pod slice

Options (environment variable giving the default in brackets):
  --name NAME          TPU VM name                                  [CLIPUP_TPU_NAME]   required
  --zone ZONE          zone, e.g. us-central2-b (v4), us-east5-a (v5p) [CLIPUP_TPU_ZONE] required
  --project PROJECT    GCP project (default: gcloud's configured one) [CLIPUP_TPU_PROJECT]
  --accelerator TYPE   e.g. v4-64, v5p-64 (create)                  [CLIPUP_TPU_ACCELERATOR]
  --version RUNTIME    TPU VM runtime (create; default by generation:
                       v4 tpu-ubuntu2204-base, v5p v2-alpha-tpuv5)   [CLIPUP_TPU_VERSION]
  --spot               create a Spot slice                           [CLIPUP_TPU_SPOT=1]
  --config FILE.py     experiment config, relative to the repo (launch) [CLIPUP_CONFIG]
  --workdir DIR        run directory, gs://... or /mnt/... (launch) [CLIPUP_WORKDIR]
  --extra "ARGS"       extra clipup-train arguments, e.g. "--config.batch_size=4096"
                       (split by the remote shell)                   [CLIPUP_EXTRA]
  --env "K=V ..."      extra environment for clipup-train (launch)  [CLIPUP_ENV]
  --repo URL           install by git clone/pull of URL instead of copying the working tree [CLIPUP_REPO]
  --remote-dir DIR     checkout on the workers, relative to \$HOME    [CLIPUP_REMOTE_DIR, clipup_jax]
  --log FILE           log file on the workers, relative to \$HOME    [CLIPUP_LOG, clipup_train.log]
  --worker W           worker for logs: 0..N-1 or all                [CLIPUP_TPU_WORKER, 0]
  --lines N            log lines shown before following (logs)       [200]
  --yes                delete without gcloud's confirmation prompt
  --dry-run            print every command (prefixed "+ ") and run nothing
  -h, --help           this help
EOF
}

die() {  # one-line error, exit 2 (usage error)
  echo "$PROG: error: $*" >&2
  exit 2
}

# Quote one word for display so that the printed line can be pasted back into a shell.
quote() {
  local s=$1
  if [[ -n $s && $s =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

# Print the command ("+ " prefix); run it unless --dry-run.
run() {
  local line="+" word
  for word in "$@"; do
    line+=" $(quote "$word")"
  done
  if [[ $DRY_RUN == 1 ]]; then
    printf '%s\n' "$line"
  else
    printf '%s\n' "$line" >&2
    "$@"
  fi
}

# Remote-shell quoting of a user value (printf %q; plain words stay as they are).
rq() {
  printf '%q' "$1"
}

# ---------------------------------------------------------------------------------------------- arguments

[[ $# -ge 1 ]] || { usage >&2; die "missing subcommand (expected $SUBCOMMANDS)"; }
case $1 in
  -h | --help) usage; exit 0 ;;
  create | install | launch | logs | delete) SUB=$1 ;;
  *) die "unknown subcommand '$1' (expected $SUBCOMMANDS)" ;;
esac
shift

NAME=${CLIPUP_TPU_NAME:-}
ZONE=${CLIPUP_TPU_ZONE:-}
PROJECT=${CLIPUP_TPU_PROJECT:-}
ACCELERATOR=${CLIPUP_TPU_ACCELERATOR:-}
VERSION=${CLIPUP_TPU_VERSION:-}
SPOT=${CLIPUP_TPU_SPOT:-0}
CONFIG=${CLIPUP_CONFIG:-}
WORKDIR=${CLIPUP_WORKDIR:-}
EXTRA=${CLIPUP_EXTRA:-}
ENVIRONMENT=${CLIPUP_ENV:-}
REPO=${CLIPUP_REPO:-}
REMOTE_DIR=${CLIPUP_REMOTE_DIR:-clipup_jax}
LOG=${CLIPUP_LOG:-clipup_train.log}
WORKER=${CLIPUP_TPU_WORKER:-0}
LINES=200
YES=0
DRY_RUN=0

while [[ $# -gt 0 ]]; do
  opt=$1
  value=""
  has_value=0
  if [[ $opt == --*=* ]]; then
    value=${opt#*=}
    opt=${opt%%=*}
    has_value=1
  fi
  case $opt in
    --name | --zone | --project | --accelerator | --version | --config | --workdir | --extra | --env | --repo | \
      --remote-dir | --log | --worker | --lines)
      if [[ $has_value == 0 ]]; then
        [[ $# -ge 2 ]] || die "$opt needs a value"
        value=$2
        shift
      fi
      case $opt in
        --name) NAME=$value ;;
        --zone) ZONE=$value ;;
        --project) PROJECT=$value ;;
        --accelerator) ACCELERATOR=$value ;;
        --version) VERSION=$value ;;
        --config) CONFIG=$value ;;
        --workdir) WORKDIR=$value ;;
        --extra) EXTRA=$value ;;
        --env) ENVIRONMENT=$value ;;
        --repo) REPO=$value ;;
        --remote-dir) REMOTE_DIR=$value ;;
        --log) LOG=$value ;;
        --worker) WORKER=$value ;;
        --lines) LINES=$value ;;
      esac
      ;;
    --spot | --yes | --dry-run | -h | --help)
      [[ $has_value == 0 ]] || die "$opt takes no value"
      case $opt in
        --spot) SPOT=1 ;;
        --yes) YES=1 ;;
        --dry-run) DRY_RUN=1 ;;
        -h | --help) usage; exit 0 ;;
      esac
      ;;
    *) die "unknown option '$opt' for $SUB (see $PROG --help)" ;;
  esac
  shift
done

require() {  # require VALUE FLAG ENVVAR
  [[ -n $1 ]] || die "$2 is required for $SUB (or set $3)"
}

require "$NAME" --name CLIPUP_TPU_NAME
require "$ZONE" --zone CLIPUP_TPU_ZONE
[[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name '$NAME': lowercase letters, digits and '-', starting with a letter"
[[ $WORKER == all || $WORKER =~ ^[0-9]+$ ]] || die "--worker '$WORKER': a worker number or 'all'"
[[ $LINES =~ ^[0-9]+$ ]] || die "--lines '$LINES': a number"

# Flags common to every gcloud call.
COMMON=(--zone="$ZONE")
[[ -z $PROJECT ]] || COMMON+=(--project="$PROJECT")
TPU_VM=(gcloud compute tpus tpu-vm)

# ---------------------------------------------------------------------------------------------- subcommands

cmd_create() {
  require "$ACCELERATOR" --accelerator CLIPUP_TPU_ACCELERATOR
  [[ $ACCELERATOR =~ ^v[0-9][a-z]*(litepod)?-[0-9]+$ ]] || die "--accelerator '$ACCELERATOR': expected e.g. v4-64 or v5p-64"
  if [[ -z $VERSION ]]; then
    case $ACCELERATOR in
      v4-*) VERSION=tpu-ubuntu2204-base ;;
      v5p-*) VERSION=v2-alpha-tpuv5 ;;
      v5litepod-* | v5e-*) VERSION=v2-alpha-tpuv5-lite ;;
      v6e-*) VERSION=v2-alpha-tpuv6e ;;
      *) die "--version is required for $ACCELERATOR (or set CLIPUP_TPU_VERSION)" ;;
    esac
  fi
  local args=(create "$NAME" "${COMMON[@]}" --accelerator-type="$ACCELERATOR" --version="$VERSION")
  [[ $SPOT != 1 ]] || args+=(--spot)
  run "${TPU_VM[@]}" "${args[@]}"
}

cmd_install() {
  local dir setup fetch
  dir=$(rq "$REMOTE_DIR")
  if [[ -n $REPO ]]; then
    local repo
    repo=$(rq "$REPO")
    fetch="if [ -d $dir/.git ]; then git -C $dir pull --ff-only; else git clone $repo $dir; fi"
  else
    # The working tree as it is (uncommitted edits included; git-ignored files, .git and .venv left out).
    local root tarball
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    tarball="${TMPDIR:-/tmp}/clipup_jax-$NAME.tar.gz"
    run tar -czf "$tarball" -C "$root" --exclude-vcs --exclude-vcs-ignores --exclude=./.venv \
      --exclude='*.egg-info' --exclude=__pycache__ .
    run "${TPU_VM[@]}" scp "$tarball" "$NAME:clipup_jax.tar.gz" "${COMMON[@]}" --worker=all
    [[ $DRY_RUN == 1 ]] || rm -f "$tarball"
    fetch="mkdir -p $dir && tar -xzf clipup_jax.tar.gz -C $dir && rm -f clipup_jax.tar.gz"
  fi
  setup="set -e; $fetch; cd $dir"
  setup+="; python3 -m venv .venv || { sudo apt-get update -q && sudo apt-get install -y -q python3-venv && python3 -m venv .venv; }"
  setup+="; .venv/bin/pip install -q -U pip"
  setup+="; .venv/bin/pip install -q -e ."
  setup+="; .venv/bin/pip install -q -U 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
  setup+="; .venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count())'"
  run "${TPU_VM[@]}" ssh "$NAME" "${COMMON[@]}" --worker=all --command="$setup"
}

# The log file as the remote shell names it (relative paths are under $HOME, whatever the current directory).
remote_log() {
  if [[ $LOG == /* ]]; then rq "$LOG"; else printf '%s/%s' "\$HOME" "$(rq "$LOG")"; fi
}

cmd_launch() {
  require "$CONFIG" --config CLIPUP_CONFIG
  require "$WORKDIR" --workdir CLIPUP_WORKDIR
  [[ $WORKDIR == gs://* || $WORKDIR == /* ]] ||
    die "--workdir '$WORKDIR': every worker must see the same run directory: use gs://BUCKET/... or a shared /mnt/... path"
  local dir log train
  dir=$(rq "$REMOTE_DIR")
  log=$(remote_log)
  # JAX_PLATFORMS=tpu: fail instead of silently training on the CPU when libtpu does not load;
  # PYTHONUNBUFFERED=1: the log file follows the run line by line.
  # jax.distributed.initialize() finds the other workers of the slice from the TPU metadata by itself.
  train="nohup env JAX_PLATFORMS=tpu PYTHONUNBUFFERED=1"
  [[ -z $ENVIRONMENT ]] || train+=" $ENVIRONMENT"
  train+=" .venv/bin/clipup-train --config $(rq "$CONFIG") --workdir $(rq "$WORKDIR")"
  [[ -z $EXTRA ]] || train+=" $EXTRA"
  run "${TPU_VM[@]}" ssh "$NAME" "${COMMON[@]}" --worker=all \
    --command="cd $dir && $train > $log 2>&1 < /dev/null & echo \"\$(hostname): clipup-train pid \$!, log $log\""
}

cmd_logs() {
  local log
  log=$(remote_log)
  run "${TPU_VM[@]}" ssh "$NAME" "${COMMON[@]}" --worker="$WORKER" --command="tail -n $LINES -F $log"
}

cmd_delete() {
  local args=(delete "$NAME" "${COMMON[@]}")
  [[ $YES != 1 ]] || args+=(--quiet)
  run "${TPU_VM[@]}" "${args[@]}"
}

"cmd_$SUB"
