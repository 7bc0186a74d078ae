#!/usr/bin/env bash
# Helpers shared by the launch scripts; sourced by them, never run alone.
#
# Dry run: a script's --dry-run flag (or DRY_RUN=1 in the environment) makes
# `run` and `run_exec` print each command on one line instead of running it.
# Every word is quoted with `printf %q`, so a printed line can be pasted back
# into bash and runs exactly that command.
#
# Usage errors print `error: ...` and the synopsis of the script's usage text
# (each script defines a `usage` function; the synopsis ends at its first
# blank line) on stderr and exit with status 2, the status the trainer itself
# uses for user errors.
set -euo pipefail

# Prints the command "$@" on one line, each word quoted with printf %q.
print_cmd() {
  local line
  printf -v line '%q ' "$@"
  printf '%s\n' "${line% }"
}

# True when commands are to be printed rather than run.
is_dry_run() {
  [[ ${DRY_RUN:-0} != 0 ]]
}

# Runs "$@", or prints it in a dry run.
run() {
  if is_dry_run; then
    print_cmd "$@"
  else
    "$@"
  fi
}

# Replaces the shell with "$@", or prints it in a dry run.
run_exec() {
  if is_dry_run; then
    print_cmd "$@"
    exit 0
  fi
  exec "$@"
}

# Prints a message and the caller's usage synopsis on stderr; exits with 2.
die_usage() {
  local text
  text=$(usage)
  printf 'error: %s\n%s\n' "$1" "${text%%$'\n\n'*}" >&2
  exit 2
}

# Prints an error on stderr and exits with status $2 (default 1).
die() {
  printf 'error: %s\n' "$1" >&2
  exit "${2:-1}"
}

# Checks that option $1 got a value: call as `need_value "$@"` from an
# option loop whose current option takes one.
need_value() {
  if (( $# < 2 )); then
    die_usage "$1 needs a value"
  fi
}

# Checks that $2 (the value of option $1) is an integer >= $3 (default 0).
check_int() {
  if [[ ! $2 =~ ^[0-9]+$ ]] || (( 10#$2 < ${3:-0} )); then
    die_usage "$1 must be an integer >= ${3:-0}, got '$2'"
  fi
}

# Checks that $2 (the value of option $1) is a number of seconds >= 0.
check_seconds() {
  if [[ ! $2 =~ ^[0-9]+([.][0-9]+)?$ ]]; then
    die_usage "$1 must be a number of seconds >= 0, got '$2'"
  fi
}

# Prints the repository root (the parent of this file's folder).
repo_root() {
  (cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
}
