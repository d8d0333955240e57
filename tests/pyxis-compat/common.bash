#!/bin/bash
# berth's replacement for pyxis 0.24's tests/common.bash: pyxis's .bats files `load ./common`
# and get these helpers. The srun/sbatch ones are pyxis's own (they only run Slurm); the
# enroot ones are mapped to what berth has. tests/pyxis-compat/run puts this file beside an
# unmodified copy of pyxis's tests and runs each test in an allocation of its own (salloc),
# as the test user.

function log() {
    echo "${@}" >&2
}

function logf() {
    printf "${@}\n" >&2
}

# `enroot list`, the one enroot command a runnable test needs (the others are in
# tests/pyxis-compat/skip): the containers berth holds on this node, one per line, from its
# runtime directory (readable by everyone; a container's own files inside are not).
function enroot() {
    case "${1:-}" in
        list)
            ls -1 -- "${BERTH_RUNTIME_DIR:-/run/berth}"
            ;;
        *)
            echo "enroot ${1:-}: berth has no equivalent (tests/pyxis-compat/skip lists the tests that need it)" >&2
            return 1
            ;;
    esac
}

function run_enroot() {
    log "+ enroot $@"
    run enroot "$@"

    log "${output}"

    echo "+ exit status: ${status}"
    [ "${status}" -eq 0 ]
}

function run_srun_unchecked() {
    log "+ srun -N1 --oversubscribe $@"
    run srun -N1 --oversubscribe "$@"

    log "${output}"

    echo "+ exit status: ${status}"
}

function run_srun() {
    run_srun_unchecked "$@"
    [ "${status}" -eq 0 ]
}

function run_sbatch_unchecked() {
    log "+ sbatch --wait $@"

    slurm_log=$(mktemp)
    run sbatch --wait -o "${slurm_log}" "$@"

    log "${output}"
    logf "+ job log (${slurm_log}):\n$(cat ${slurm_log})"
    rm -f "${slurm_log}"

    echo "+ exit status: ${status}"
}

function run_sbatch() {
    run_sbatch_unchecked "$@"
    [ "${status}" -eq 0 ]
}

# Every test runs in an allocation of its own, and berth removes a job's named containers
# when the job ends: there is nothing left over from an earlier test to remove.
function enroot_cleanup() {
    :
}
