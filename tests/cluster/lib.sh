# shellcheck shell=bash disable=SC2034 # the settings here are used by the scripts that source it
# Shared by tests/cluster/up and tests/cluster/down: where the test cluster keeps its
# files, the state file that records what `up` started, and how processes are stopped.
# Sourced, never executed; the callers set `set -euo pipefail`.

# CI and `env -i` callers may hand us a PATH without the sbin dirs (munged, slurmd, ...)
# or cargo's.
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/root/.cargo/bin:$PATH"

# Everything `up` creates at run time lives under these directories, so `down` knows
# exactly which mounts and files are the cluster's.
STATE_DIR=/run/berth-test
STATE_FILE=$STATE_DIR/state
# What tests/cluster/up added for /dev/mqueue ("dir", "mount"), for down to remove.
MQUEUE_MARK=$STATE_DIR/mqueue-added
LIB_DIR=/var/lib/berth-test
LOG_DIR=/var/log/berth-test
TLS_DIR=$LIB_DIR/tls
# berth's own runtime and cache dirs (named in berth.toml): FUSE mounts a job leaves
# behind show up under them.
BERTH_RUN_DIR=/run/berth
BERTH_CACHE_DIR=/var/cache/berth
SLURMCTLD_SPOOL=/var/spool/berth-test/slurmctld
SLURMD_SPOOL=/var/spool/berth-test/slurmd
# slurmd's port; with several nodes (up --nodes N) node nK listens on SLURMD_PORT + K - 1.
SLURMD_PORT=6818
# With several nodes, node nK's own "local disk": NODES_DIR/nK/NAME is bound onto PATH in
# that node's mount namespace for each NAME:PATH:MODE here (berth.toml's directories, and
# /tmp, which Slurm's pmix plugin uses per job and step and so per node).
NODES_DIR=$LIB_DIR/nodes
NODE_LOCAL_DIRS=("cache:$BERTH_CACHE_DIR:0755" "run:$BERTH_RUN_DIR:0755"
                 "stage:/var/tmp/berth-stage:1777" "containers:/var/tmp/berth-containers:1777"
                 "tmp:/tmp:1777")
CLUSTER_DIRS=("$STATE_DIR" "$LIB_DIR" "$BERTH_RUN_DIR" "$BERTH_CACHE_DIR"
              /var/spool/berth-test /home/berthtest)

TEST_USER=berthtest
TEST_UID=1100
TEST_HOME=/home/$TEST_USER
# A second user, for what one user must not get through another (a cached private image).
OTHER_USER=berthother
OTHER_UID=1101
# PrologSlurmctld: pins a job's image tag on the controller (docs/REGISTRIES.md).
PIN_JOB_SCRIPT=/etc/slurm/berth-pin-job
REGISTRY_TLS_PORT=5000
REGISTRY_PLAIN_PORT=5001
# The per-registry CA location of the containers/docker layout; berth and skopeo read it.
CERTS_D=/etc/containers/certs.d
CA_INSTALLED=$CERTS_D/localhost:$REGISTRY_TLS_PORT/ca.crt

# Which Slurm the cluster runs: Debian's packaged 22.05 (the default), or a release that
# tests/cluster/slurm-release installed from the shared sources (up --slurm RELEASE).
# select_slurm_release [RELEASE] sets where that release's daemons, configs and plugin are;
# called here for Debian's, and again by up for another.
select_slurm_release() {
    SLURM_RELEASE=${1:-}
    if [[ -z $SLURM_RELEASE ]]; then
        SLURM_PREFIX=/usr
        SLURM_CONF_DIR=/etc/slurm
        SLURM_PLUGIN_DIR=/usr/lib/x86_64-linux-gnu/slurm-wlm
    else
        SLURM_PREFIX=/opt/slurm-$SLURM_RELEASE
        SLURM_CONF_DIR=/etc/slurm-$SLURM_RELEASE
        SLURM_PLUGIN_DIR=$SLURM_PREFIX/lib/slurm
    fi
    SPANK_PLUGIN=$SLURM_PLUGIN_DIR/spank_berth.so
}
select_slurm_release ''

# The user commands of a release cluster (srun, sbatch, scontrol, ...) are linked into
# /usr/local/bin, which comes before Debian's /usr/bin on every PATH (this file's, the e2e
# harness's, runuser's), so tests and admins reach the cluster's release without knowing
# which it is. A release's commands default to its own sysconfdir's slurm.conf.
link_slurm_commands() {
    local program
    unlink_slurm_commands
    for program in "$SLURM_PREFIX"/bin/*; do
        [[ -x $program ]] || continue
        [[ ! -e /usr/local/bin/${program##*/} ]] \
            || die "/usr/local/bin/${program##*/} exists and is not a Slurm release's link"
        ln -s "$program" "/usr/local/bin/${program##*/}"
    done
}

# unlink_slurm_commands: remove the links link_slurm_commands made (links into /opt/slurm-*
# only), so Debian's commands are found again.
unlink_slurm_commands() {
    local link
    for link in /usr/local/bin/*; do
        if [[ -L $link && $(readlink "$link") == /opt/slurm-*/bin/* ]]; then
            rm -f "$link"
        fi
    done
}
# Where the berth package installs the launcher (up installs the package).
BERTH_BIN=/usr/bin/berth
BERTH_CONFIG=/etc/berth/berth.toml

log() { printf 'cluster: %s\n' "$*" >&2; }
die() { printf 'cluster: error: %s\n' "$*" >&2; exit 1; }

# state_get KEY: the value recorded for KEY, or nothing.
state_get() {
    [[ -f $STATE_FILE ]] || return 0
    sed -n "s/^$1=//p" "$STATE_FILE" | tail -n 1
}

# state_set KEY VALUE: record (or replace) one key. Written through a temporary file and
# rename so a reader (the Rust harness, a concurrent `down`) never sees a half file.
# Values are plain tokens (PIDs, paths, ports, digests): no quoting needed or allowed.
state_set() {
    local key=$1 value=$2 tmp
    [[ $value != *[[:space:]]* ]] || die "state value for $key contains whitespace: $value"
    mkdir -p "$STATE_DIR"
    tmp=$(mktemp "$STATE_DIR/.state.XXXXXX")
    if [[ -f $STATE_FILE ]]; then
        grep -v "^$key=" "$STATE_FILE" >"$tmp" || true
    fi
    printf '%s=%s\n' "$key" "$value" >>"$tmp"
    chmod 0644 "$tmp"
    mv -f "$tmp" "$STATE_FILE"
}

# pid_matches PID COMM: true when PID is alive and is still the program we started
# (its comm), so a recycled PID never gets a signal from us.
pid_matches() {
    local pid=$1 comm=$2 actual
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    actual=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [[ $actual == "$comm" ]]
}

# stop_pid NAME PID COMM: SIGTERM, wait up to 20 s, then SIGKILL and wait up to 10 s more.
stop_pid() {
    local name=$1 pid=$2 comm=$3 i
    if ! pid_matches "$pid" "$comm"; then
        return 0
    fi
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 200; i++)); do
        pid_matches "$pid" "$comm" || return 0
        sleep 0.1
    done
    log "$name (pid $pid) ignored SIGTERM for 20 s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        pid_matches "$pid" "$comm" || return 0
        sleep 0.1
    done
    die "$name (pid $pid) is still alive after SIGKILL"
}

# cluster_mounts: mount points under the cluster's directories, deepest first.
# /proc/mounts escapes spaces and friends as octal (\040); printf %b decodes them.
cluster_mounts() {
    local mnt dir decoded
    while read -r _ mnt _; do
        decoded=$(printf '%b' "$mnt")
        for dir in "${CLUSTER_DIRS[@]}"; do
            if [[ $decoded == "$dir" || $decoded == "$dir"/* ]]; then
                printf '%s\n' "$decoded"
                break
            fi
        done
    done </proc/mounts | sort -r -u
}

unmount_cluster_dirs() {
    local mnt
    while IFS= read -r mnt; do
        [[ -n $mnt ]] || continue
        log "unmounting $mnt"
        # A FUSE helper that is already gone leaves a mount that only a lazy unmount clears.
        umount "$mnt" 2>/dev/null || umount -l "$mnt" || die "cannot unmount $mnt"
    done < <(cluster_mounts)
}

# stop_cluster: stop everything the state file names, newest first, then clear mounts.
# Safe to call when nothing runs (no state file): a no-op.
stop_cluster() {
    local pid jobs i
    if [[ -f $STATE_FILE ]]; then
        # Cancel jobs while slurmctld still answers so their slurmstepds (children of our
        # slurmd, detached from it) end with them instead of outliving the cluster.
        if pid_matches "$(state_get SLURMCTLD_PID)" slurmctld; then
            jobs=$(timeout 10 squeue -h -o %i 2>/dev/null || true)
            if [[ -n $jobs ]]; then
                log "cancelling jobs: $(echo "$jobs" | tr '\n' ' ')"
                # shellcheck disable=SC2086 # one job id per word
                timeout 10 scancel $jobs 2>/dev/null || true
                for ((i = 0; i < 100; i++)); do
                    [[ -z $(timeout 5 squeue -h -o %i 2>/dev/null || true) ]] && break
                    sleep 0.2
                done
            fi
        fi
        # Every node's slurmd (SLURMD_PID_<node>; SLURMD_PID alone from an older up).
        for pid in $(sed -n 's/^SLURMD_PID[_A-Za-z0-9]*=//p' "$STATE_FILE" | sort -u); do
            stop_pid slurmd "$pid" slurmd
        done
        stop_pid slurmctld "$(state_get SLURMCTLD_PID)" slurmctld
        stop_pid "registry :$REGISTRY_PLAIN_PORT" "$(state_get REGISTRY_PLAIN_PID)" docker-registry
        stop_pid "registry :$REGISTRY_TLS_PORT" "$(state_get REGISTRY_TLS_PID)" docker-registry
        stop_pid munged "$(state_get MUNGED_PID)" munged
    fi
    # A step slurmd left running (its job was not cancellable) belongs to this cluster:
    # only our slurmd runs on this machine, and it is stopped by now.
    if [[ -f $STATE_FILE ]]; then
        for pid in $(pgrep -x slurmstepd || true); do
            stop_pid slurmstepd "$pid" slurmstepd
        done
    fi
    unmount_cluster_dirs
    rm -f "$STATE_FILE"
    unlink_slurm_commands
}
