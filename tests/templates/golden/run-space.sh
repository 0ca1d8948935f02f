#!/bin/bash
#SBATCH --job-name=hpcseg-run
#SBATCH --partition=gpu
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=4
#SBATCH --mem=16G
#SBATCH --time=02:00:00
#SBATCH --gres=gpu:1
#SBATCH --signal=B:USR2@90
# Rendered by hpcseg from run.sh.j2: edit the templates, not this file.
set -u
export HPCSEG_JOB_DIR='/home/alice/My Work/.hpcseg/jobs/20240601-120000-run'
export HPCSEG_CLIENT_VERSION=0.0.0+golden
cd -- "$HPCSEG_JOB_DIR" || exit 1
# A requeued job starts again in the same folder: forget the last run's ending.
rm -f -- exit_code ending

# exit_code is the last word on how this job ended once squeue/qstat have forgotten it: the job's exit status, or
# 128+N when signal N stopped it (143: SIGTERM from scancel/qdel, or the walltime: Slurm sends SIGTERM and then,
# KillWait seconds later (default 30), SIGKILL; PBS waits kill_delay). It is written atomically (temp + mv), at
# once when a signal arrives (SIGKILL may follow), and again on exit.
_hpcseg_child=
_hpcseg_signal_rc=
_hpcseg_write_exit_code() {
    printf '%s\n' "$1" > "$HPCSEG_JOB_DIR/.exit_code.$$" && mv -f -- "$HPCSEG_JOB_DIR/.exit_code.$$" "$HPCSEG_JOB_DIR/exit_code"
}
_hpcseg_on_exit() {
    local rc=$?
    trap - EXIT HUP INT TERM USR2
    if [ -n "$_hpcseg_signal_rc" ]; then rc=$_hpcseg_signal_rc; fi
    _hpcseg_cleanup
    _hpcseg_write_exit_code "$rc"
    exit "$rc"
}
_hpcseg_on_signal() {
    _hpcseg_signal_rc=$2
    _hpcseg_write_exit_code "$2"
    echo "hpcseg: got SIG$1, stopping" >&2
    if [ -z "$_hpcseg_child" ]; then exit "$2"; fi
    kill -TERM "$_hpcseg_child" 2>/dev/null
}
# SIGUSR2 warns that the walltime is near (Slurm header: --signal=B:USR2@SECONDS): note it for the client, and go on.
_hpcseg_on_walltime_warning() {
    printf 'walltime\n' > "$HPCSEG_JOB_DIR/ending"
}
trap _hpcseg_on_exit EXIT
trap '_hpcseg_on_signal HUP 129' HUP
trap '_hpcseg_on_signal INT 130' INT
trap '_hpcseg_on_signal TERM 143' TERM
trap _hpcseg_on_walltime_warning USR2

# Run a command in the background and wait for it: bash runs a trap only after a foreground command returns,
# while `wait` returns at once, so a SIGTERM is handled (and passed on) while the command runs.
_hpcseg_run() {
    _hpcseg_exec "$@" &
    _hpcseg_child=$!
    local rc=0
    wait "$_hpcseg_child" || rc=$?
    while kill -0 "$_hpcseg_child" 2>/dev/null; do
        rc=0
        wait "$_hpcseg_child" || rc=$?
    done
    _hpcseg_child=
    return "$rc"
}
# `started` (epoch seconds) lets the client tell a walltime kill (SIGTERM after the walltime) from a cancel once the
# scheduler has forgotten the job. Written once the traps are set: a signal from then on always leaves exit_code.
date +%s > started

_hpcseg_cleanup() {
    :
}

# How every program of this job runs (singularity): always in the subshell _hpcseg_run makes, so
# `exec` hands signals straight to the program.
_hpcseg_exec() {
    exec singularity exec --nv --bind '/home/alice/My Work/.hpcseg' --bind '/home/alice/Data Sets' '/home/alice/My Images/hpcseg server.sif' "$@"
}

_hpcseg_run python3 -c 'print('"'"'hello, world'"'"')' --out '/tmp/a b'
