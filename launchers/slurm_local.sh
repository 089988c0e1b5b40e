#!/usr/bin/env bash
# A real single-node SLURM cluster with accounting, on this machine, for clipbd's SLURM tests and for
# trying the launchers without a cluster (Debian/Ubuntu, as root, no systemd needed):
#
#   launchers/slurm_local.sh up       # install packages if missing, configure, start; prints `sinfo`
#   launchers/slurm_local.sh status   # daemons and nodes
#   launchers/slurm_local.sh down     # stop every daemon this script started (by pid file)
#   launchers/slurm_local.sh clean    # down, then delete the cluster's state (job ids restart at 1)
#
# Daemons: munged -> mariadbd (private datadir, 127.0.0.1:$DB_PORT) -> slurmdbd -> slurmctld -> slurmd.
# Accounting (slurmdbd) matters: without it `sacct` fails and submitit waits forever for a job that
# died without writing its result (scancel, OOM, timeout); with it submitit reports the failure.
# Environment:
#   CLIPBD_SLURM_STATE  state, logs and pid files (default /var/lib/clipbd-slurm)
#   CLIPBD_SLURM_NICE   nice value of slurmd and so of every job it starts (default 0)
#   CLIPBD_SLURM_CPUS   CPUs the node advertises (default: nproc)
# The config goes to /etc/slurm/{slurm,slurmdbd}.conf (where every SLURM command looks); the script
# refuses to overwrite such files that it did not write.
set -euo pipefail

STATE=${CLIPBD_SLURM_STATE:-/var/lib/clipbd-slurm}
NICE=${CLIPBD_SLURM_NICE:-0}
CLUSTER=clipbd
DB_PORT=${CLIPBD_SLURM_DB_PORT:-3307}
ETC=/etc/slurm
MARK="# written by clipbd launchers/slurm_local.sh"
PKGS=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)

log() { echo "slurm_local: $*" >&2; }
die() { log "error: $*"; exit 1; }

install_packages() {
    local missing=0
    for b in slurmctld slurmd slurmdbd sbatch sacctmgr munged mariadbd mariadb-install-db; do
        command -v "$b" >/dev/null || [ -x "/usr/sbin/$b" ] || missing=1
    done
    [ "$missing" = 0 ] && return
    [ "$(id -u)" = 0 ] || die "SLURM packages missing and not root: apt-get install ${PKGS[*]}"
    log "installing ${PKGS[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq "${PKGS[@]}" >"$STATE/apt.log" 2>&1 ||
        { apt-get update -qq >>"$STATE/apt.log" 2>&1 && apt-get install -y -qq "${PKGS[@]}" >>"$STATE/apt.log" 2>&1; } ||
        die "apt-get install failed; see $STATE/apt.log"
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local t=$1 what=$2; shift 2
    for _ in $(seq $((t * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
    die "$what did not come up within ${t}s; logs in $STATE/log"
}

write_conf() {  # write_conf PATH < content  (only over files this script wrote)
    if [ -e "$1" ] && ! grep -qF "$MARK" "$1"; then
        die "$1 exists and was not written by this script; move it away to use the local cluster"
    fi
    { echo "$MARK"; cat; } >"$1"
}

configure() {
    local cpus=${CLIPBD_SLURM_CPUS:-$(nproc)}
    local mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
    mkdir -p "$ETC" "$STATE"/{log,ctld,spool}
    write_conf "$ETC/slurm.conf" <<EOF
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=1
KillWait=5
InactiveLimit=0
SlurmdParameters=config_overrides
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    write_conf "$ETC/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=$STATE/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=clipbd
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$ETC/slurmdbd.conf"
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi  # a munged already serves
    [ -f /etc/munge/munge.key ] || { mungekey --create 2>/dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 2>/dev/null; }
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    runuser -u munge -- /usr/sbin/munged --force
    cp /run/munge/munged.pid "$STATE/munged.pid" 2>/dev/null || pgrep -u munge -n munged >"$STATE/munged.pid" || true
    wait_for 10 munged bash -c "munge -n | unmunge"
}

start_db() {
    alive "$STATE/mariadb.pid" && return
    if [ ! -d "$STATE/mysql/mysql" ]; then
        mariadb-install-db --user=root --datadir="$STATE/mysql" --auth-root-authentication-method=socket \
            --skip-test-db >"$STATE/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed; see $STATE/log"
    fi
    nohup /usr/sbin/mariadbd --no-defaults --user=root --datadir="$STATE/mysql" --socket="$STATE/mysql.sock" \
        --pid-file="$STATE/mariadb.pid" --bind-address=127.0.0.1 --port="$DB_PORT" \
        --log-error="$STATE/log/mariadb.log" --innodb-buffer-pool-size=32M >/dev/null 2>&1 &
    wait_for 30 mariadb mariadb --no-defaults --socket="$STATE/mysql.sock" -e "select 1"
    mariadb --no-defaults --socket="$STATE/mysql.sock" -e "
        CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'clipbd';
        CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'clipbd';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
}

up() {
    [ "$(id -u)" = 0 ] || die "run as root (it starts system daemons)"
    mkdir -p "$STATE/log"
    if alive "$STATE/slurmctld.pid" && alive "$STATE/slurmd.pid"; then
        log "already up"; sinfo; return
    fi
    install_packages
    configure
    start_munge
    start_db
    alive "$STATE/slurmdbd.pid" || /usr/sbin/slurmdbd
    wait_for 30 slurmdbd sacctmgr -n show cluster
    sacctmgr -i -n show cluster format=cluster | grep -qw "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
    alive "$STATE/slurmctld.pid" || /usr/sbin/slurmctld
    wait_for 30 slurmctld scontrol ping
    # The node is named "localhost" whatever the host name is, hence -N.
    alive "$STATE/slurmd.pid" || nice -n "$NICE" /usr/sbin/slurmd -N localhost
    wait_for 30 "node localhost" bash -c "sinfo -h -n localhost -o %T | grep -Eq '^(idle|mixed|allocated)'"
    log "up (state $STATE, nice $NICE)"
    sinfo
}

stop_pid() {  # stop_pid NAME PIDFILE
    alive "$2" || { rm -f "$2"; return 0; }
    local pid; pid=$(cat "$2")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && { log "$1 ($pid) ignored SIGTERM, killing"; kill -9 "$pid" 2>/dev/null || true; }
    rm -f "$2"
}

down() {
    # Jobs first, so that their processes do not outlive slurmd.
    command -v scancel >/dev/null && alive "$STATE/slurmctld.pid" && scancel --full --quiet -u root 2>/dev/null || true
    stop_pid slurmd "$STATE/slurmd.pid"
    stop_pid slurmctld "$STATE/slurmctld.pid"
    stop_pid slurmdbd "$STATE/slurmdbd.pid"
    stop_pid mariadbd "$STATE/mariadb.pid"
    stop_pid munged "$STATE/munged.pid"
    log "down"
}

status() {
    for d in munged mariadb slurmdbd slurmctld slurmd; do
        if alive "$STATE/$d.pid"; then echo "$d: running (pid $(cat "$STATE/$d.pid"))"; else echo "$d: stopped"; fi
    done
    alive "$STATE/slurmctld.pid" && sinfo || true
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    clean) down; rm -rf "$STATE"; for f in "$ETC/slurm.conf" "$ETC/slurmdbd.conf"; do grep -qsF "$MARK" "$f" && rm -f "$f"; done; log "state removed" ;;
    *) echo "usage: $0 up|down|status|clean" >&2; exit 2 ;;
esac
