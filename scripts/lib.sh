# Shared helpers for scripts/test and scripts/demo. Sourced, not run.
# shellcheck shell=bash

SCRIPTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
REPO_ROOT=$(cd "$SCRIPTS_DIR/.." && pwd -P)
export SCRIPTS_DIR REPO_ROOT

# rustup puts cargo in ~/.cargo/bin, which a non-login shell (CI, sudo) may
# not have on PATH.
if ! command -v cargo >/dev/null 2>&1 && [[ -x ${CARGO_HOME:-$HOME/.cargo}/bin/cargo ]]; then
    PATH=${CARGO_HOME:-$HOME/.cargo}/bin:$PATH
    export PATH
fi

# No prompts, no colours that break logs when nobody watches.
export DEBIAN_FRONTEND=noninteractive
if [[ ! -t 1 ]]; then
    export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
fi

say() { printf '\n==> %s\n' "$*"; }
warn() { printf '%s: warning: %s\n' "${0##*/}" "$*" >&2; }
die() {
    printf '%s: error: %s\n' "${0##*/}" "$*" >&2
    exit 1
}

now_s() { date +%s; }

# Cluster lifecycle with cleanup. `cluster_start` makes a temp dir, starts a
# cluster there, sources its env and arranges `cluster_stop` on any exit
# (including Ctrl-C and TERM); it returns 1 if the cluster did not start.
# CLUSTER_DIR names the dir. A script may define `stop_children`, which the
# signal trap calls first (to end its background work).
CLUSTER_DIR=
KEEP_CLUSTER_DIR=0

# Every process started after `cluster_start` carries this variable in its
# environment (cargo, the tests, the dockerds and plugins they start), so
# whatever such a process leaves running can be found and stopped; processes
# of other runs or other people are never touched.
RUN_MARKER=

# run_pids: pids of live processes carrying RUN_MARKER, except this shell.
run_pids() {
    [[ -n $RUN_MARKER ]] || return 0
    local f pid
    # -z: environ entries end in NUL; one grep reads all of /proc.
    while IFS= read -r f; do
        pid=${f#/proc/}
        pid=${pid%/environ}
        [[ $pid == "$$" || $pid == "$BASHPID" ]] && continue
        if [[ -e /proc/$pid ]]; then printf '%s\n' "$pid"; fi
    done < <(grep -lzxF -- "$RUN_MARKER" /proc/[0-9]*/environ 2>/dev/null || true)
}

# reap_leftovers: stops (TERM, then KILL after 10 s) what this run's commands
# left running, says what it was, and returns 1 if there was anything.
reap_leftovers() {
    local pids i
    pids=$(run_pids)
    [[ -n $pids ]] || return 0
    warn "processes left running by this run (stopping them):"
    # shellcheck disable=SC2086 # one pid per word
    ps -o pid=,args= -p ${pids//$'\n'/,} 2>/dev/null | cut -c1-160 | sed 's/^/    /' >&2 || true
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        pids=$(run_pids)
        [[ -n $pids ]] || return 1
        sleep 0.1
    done
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    return 1
}

cluster_stop() {
    if [[ -n $CLUSTER_DIR && -d $CLUSTER_DIR ]]; then
        "$SCRIPTS_DIR/ceph-dev" stop "$CLUSTER_DIR" || warn "stopping the cluster in $CLUSTER_DIR failed"
        if [[ $KEEP_CLUSTER_DIR == 1 ]]; then
            printf '%s: cluster logs kept in %s/log\n' "${0##*/}" "$CLUSTER_DIR" >&2
        else
            rm -rf "$CLUSTER_DIR"
            printf '%s: removed %s\n' "${0##*/}" "$CLUSTER_DIR" >&2
        fi
    fi
    CLUSTER_DIR=
}

on_exit() {
    local rc=$?
    trap - EXIT INT TERM
    if declare -F stop_children >/dev/null; then
        stop_children
    fi
    reap_leftovers || true
    cluster_stop
    exit "$rc"
}
on_signal() {
    local sig=$1 code=$2
    trap - EXIT INT TERM
    printf '\n%s: interrupted (%s), cleaning up\n' "${0##*/}" "$sig" >&2
    if declare -F stop_children >/dev/null; then
        stop_children
    fi
    reap_leftovers || true
    cluster_stop
    exit "$code"
}

cluster_start() {
    trap on_exit EXIT
    trap 'on_signal INT 130' INT
    trap 'on_signal TERM 143' TERM
    CLUSTER_DIR=$(mktemp -d "${TMPDIR:-/tmp}/docker-rbd-ceph.XXXXXX")
    if ! "$SCRIPTS_DIR/ceph-dev" start "$CLUSTER_DIR"; then
        KEEP_CLUSTER_DIR=1
        warn "the Ceph cluster did not start (logs in $CLUSTER_DIR/log)"
        return 1
    fi
    # shellcheck source=/dev/null
    source "$CLUSTER_DIR/env"
    RUN_MARKER=DOCKER_RBD_SCRIPTS_RUN=$CLUSTER_DIR
    export "${RUN_MARKER?}"
}
