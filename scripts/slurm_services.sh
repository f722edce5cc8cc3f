#!/usr/bin/env bash
# A real Slurm on this one machine, for the tests: munge + slurmctld + slurmd.
#
#   scripts/slurm_services.sh up      install (apt) when missing, configure, start; idempotent
#   scripts/slurm_services.sh down    stop exactly what `up` started
#   scripts/slurm_services.sh status  print the nodes
#
# Debian's slurm-wlm 22.05 with no systemd (see ../shared/ENVIRONMENT.md).
# Everything lives under $SFTC_SLURM_ROOT (default /tmp/sftc-slurm); only
# /etc/slurm/slurm.conf (so every client finds the controller) and three
# /etc/hosts lines are written outside it. Must run as root.
#
# Nodes (one slurmd each, `slurmd -N NAME`, all on this host):
#   partition `debug` (default): node0, 2 CPUs          -> single-node jobs
#   partition `two`:             node[1-2], 2 CPUs each  -> fake two-node jobs
# Fake nodes use 127.0.1.x addresses: Ray rewrites 127.0.0.1 to eth0's address.
set -euo pipefail

ROOT=${SFTC_SLURM_ROOT:-/tmp/sftc-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# managed by sft-cluster scripts/slurm_services.sh"
NODES=(node0 node1 node2)
declare -A ADDR=([node0]=127.0.1.10 [node1]=127.0.1.1 [node2]=127.0.1.2)
declare -A PORT=([node0]=17000 [node1]=17001 [node2]=17002)
CTLD_PORT=${SFTC_SLURMCTLD_PORT:-16817}

log() { echo "slurm_services: $*" >&2; }
die() { log "error: $*"; exit 1; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null; then
        return
    fi
    [ "$(id -u)" = 0 ] || die "slurm-wlm/munge are missing and installing them needs root"
    log "installing slurm-wlm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || die "apt-get update failed"
    apt-get install -y -qq slurm-wlm munge >/dev/null || die "apt-get install slurm-wlm munge failed"
}

write_config() {
    mkdir -p "$ROOT"/{state,log,run} "${NODES[@]/#/$ROOT/spool/}" /etc/slurm
    if [ -e "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
        die "$CONF exists and was not written by this script; refusing to replace it"
    fi
    local cpus
    cpus=${SFTC_SLURM_CPUS:-2}
    cat >"$CONF.tmp" <<EOF
$MARK (root: $ROOT)
ClusterName=sftc
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool/%n
SlurmctldPidFile=$ROOT/run/slurmctld.pid
SlurmdPidFile=$ROOT/run/slurmd-%n.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobCompType=jobcomp/filetxt
JobCompLoc=$ROOT/log/jobcomp.txt
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MinJobAge=3600
KillWait=5
ReturnToService=2
SlurmdTimeout=300
InactiveLimit=0
Waittime=0
NodeName=node0 NodeAddr=${ADDR[node0]} NodeHostname=localhost Port=${PORT[node0]} CPUs=$cpus RealMemory=8000 State=UNKNOWN
NodeName=node[1-2] NodeAddr=${ADDR[node1]%.*}.[1-2] NodeHostname=localhost Port=${PORT[node1]}-${PORT[node2]} CPUs=$cpus RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=node0 Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
PartitionName=two Nodes=node[1-2] MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    if [ -e "$CONF" ] && cmp -s "$CONF" "$CONF.tmp"; then
        rm -f "$CONF.tmp"
    else
        mv "$CONF.tmp" "$CONF"
    fi
    for node in "${NODES[@]}"; do
        grep -qE "^${ADDR[$node]//./\\.}[[:space:]]+$node\$" /etc/hosts \
            || echo "${ADDR[$node]} $node" >>/etc/hosts
    done
}

# A live process of the pid file (a zombie left for a parent that never reaps it is not).
alive() {
    local pid
    [ -s "$1" ] || return 1
    pid=$(cat "$1")
    kill -0 "$pid" 2>/dev/null && [ "$(awk '{ print $3 }' "/proc/$pid/stat" 2>/dev/null)" != Z ]
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return
    fi
    [ -s /etc/munge/munge.key ] || {
        log "creating /etc/munge/munge.key"
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
        chown munge:munge /etc/munge/munge.key
        chmod 400 /etc/munge/munge.key
    }
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 755 /run/munge
    log "starting munged"
    runuser -u munge -- munged --force
    touch "$ROOT/run/munged.ours"
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.1
    done
    die "munged did not come up (munge -n | unmunge fails)"
}

start_slurm() {
    if ! alive "$ROOT/run/slurmctld.pid"; then
        log "starting slurmctld"
        # -i: ignore state it cannot recover; keeps jobs otherwise (idempotent restarts)
        slurmctld -i || die "slurmctld failed to start; see $ROOT/log/slurmctld.log"
    fi
    for node in "${NODES[@]}"; do
        if ! alive "$ROOT/run/slurmd-$node.pid"; then
            log "starting slurmd -N $node"
            slurmd -N "$node" || die "slurmd -N $node failed; see $ROOT/log/slurmd-$node.log"
        fi
    done
    local state=""
    for _ in $(seq 150); do
        state=$(sinfo -h -N -o "%N %T" 2>/dev/null | sort -u || true)
        if [ -n "$state" ] && ! grep -qvE " (idle|mixed|allocated|completing)\$" <<<"$state"; then
            log "up: $(tr '\n' ' ' <<<"$state")"
            return
        fi
        if grep -qE " (down|drained|draining|fail)" <<<"$state"; then
            scontrol update NodeName="$(grep -E ' (down|drain|fail)' <<<"$state" | awk '{print $1}' | paste -sd,)" \
                State=RESUME >/dev/null 2>&1 || true
        fi
        sleep 0.2
    done
    die "nodes not ready after 30 s: ${state:-no answer from slurmctld}; see $ROOT/log/"
}

stop_slurm() {
    local pidfile
    for pidfile in "$ROOT"/run/slurmd-*.pid "$ROOT/run/slurmctld.pid"; do
        [ -e "$pidfile" ] || continue
        if alive "$pidfile"; then
            kill "$(cat "$pidfile")" 2>/dev/null || true
            for _ in $(seq 50); do alive "$pidfile" || break; sleep 0.1; done
        fi
        rm -f "$pidfile"
    done
    if [ -e "$ROOT/run/munged.ours" ] && [ -s /run/munge/munged.pid ]; then
        kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
        rm -f "$ROOT/run/munged.ours"
    fi
    log "stopped"
}

case "${1:-up}" in
    up)
        [ "$(id -u)" = 0 ] || die "run as root (slurmd runs jobs as any user)"
        install_packages
        write_config
        start_munge
        start_slurm
        ;;
    down) stop_slurm ;;
    status) sinfo -N ;;
    *) die "usage: $0 up|down|status" ;;
esac
