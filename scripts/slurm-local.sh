#!/usr/bin/env bash
# slurm-local.sh — a real single-node Slurm cluster on loopback, for tests and
# for developers.  Uses Debian 12's packages (slurm-wlm 22.05, munge 0.5.15).
#
#   scripts/slurm-local.sh install          # apt-get install slurm-wlm munge (root)
#   eval "$(scripts/slurm-local.sh up)"     # start; prints `export SLURM_CONF=...`
#   scripts/slurm-local.sh status           # sinfo + squeue
#   scripts/slurm-local.sh down             # stop our daemons, remove the dir
#
# `up [DIR]`   everything (config, munge key/socket, state, spool, logs, pids)
#              lives under DIR (default: a fresh mktemp -d /tmp/rlhf-slurm.XXXXXX).
#              stdout carries only the `export` lines; all else goes to stderr.
# `down [DIR]` DIR defaults to $RLHF_SLURM_DIR.  Cancels all jobs, stops only
#              the daemons this script started for DIR (pid files, checked
#              against /proc/PID/cmdline), then removes DIR.  Idempotent.
# `status [DIR]`
#
# Environment knobs for `up`:
#   RLHF_SLURM_CPUS     CPUs to declare for the node (default: max(nproc, 8)).
#                       More than the physical count is fine: slurmd is run
#                       with SlurmdParameters=config_overrides.
#   RLHF_SLURM_TIMEOUT  seconds to wait for the node to be idle (default 30).
#   RLHF_SLURM_CRED_EXPIRE  job credential lifetime in s (default 10); also
#                       the delay before a requeued job may start again.
#
# See docs/slurm-local.md for the slurm.conf choices and verified behaviours.
set -euo pipefail

PROG=$(basename "$0")
MARKER=.rlhf-slurm-local
log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { log "error: $*"; exit 1; }

need_root() { [[ $(id -u) -eq 0 ]] || die "$1 must run as root (SlurmUser=root, munged key ownership)"; }

have_all() {
  local b
  for b in slurmctld slurmd munged sbatch; do
    command -v "$b" >/dev/null 2>&1 || return 1
  done
}

# Daemons live in /usr/sbin, which a non-login root shell may lack on PATH.
export PATH="$PATH:/usr/sbin:/sbin"

cmd_install() {
  if have_all; then
    log "slurmctld, slurmd, munged, sbatch already installed; nothing to do"
    return 0
  fi
  need_root install
  export DEBIAN_FRONTEND=noninteractive
  log "apt-get update"
  apt-get update >&2
  log "apt-get install slurm-wlm munge"
  apt-get install -y --no-install-recommends slurm-wlm munge >&2
  have_all || die "install finished but slurmctld/slurmd/munged/sbatch still missing from PATH"
  # (sinfo --version needs a config to run, so ask dpkg.)
  log "installed: $(dpkg-query -W -f='slurm-wlm ${Version}, munge ' slurm-wlm 2>/dev/null)$(dpkg-query -W -f='${Version}' munge 2>/dev/null)"
}

# --- helpers -----------------------------------------------------------------

# Listening TCP ports (decimal), from /proc so no ss/netstat is needed.
listening_ports() {
  local hex
  awk 'NR > 1 && $4 == "0A" { n = split($2, a, ":"); print a[n] }' \
    /proc/net/tcp /proc/net/tcp6 2>/dev/null |
    while read -r hex; do echo $(( 16#$hex )); done | sort -un
}

# Ports already claimed by other live rlhf-slurm clusters' configs (they may
# not be listening yet while that cluster is starting).
claimed_ports() {
  local f
  for f in /tmp/rlhf-slurm.*/slurm.conf; do
    [[ -f $f ]] || continue
    sed -n 's/^Slurm\(ctld\|d\)Port=\([0-9]*\).*/\2/p' "$f"
  done
}

# Print two distinct free ports in 17000-17999.
pick_ports() {
  local used p picked=() tries=0
  used=" $(listening_ports | tr '\n' ' ') $(claimed_ports | tr '\n' ' ') "
  while (( ${#picked[@]} < 2 )); do
    (( tries++ < 2000 )) || die "no free port in 17000-17999"
    p=$(( 17000 + RANDOM % 1000 ))
    [[ $used == *" $p "* ]] && continue
    used+="$p "
    picked+=("$p")
  done
  echo "${picked[@]}"
}

# Is PID alive, is its program NAME and does its command line name DIR?
# (A zombie has an empty command line and does not count.)
ours() {
  local pid=$1 name=$2 dir=$3 cmdline argv0
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  [[ -r /proc/$pid/cmdline ]] || return 1
  cmdline=$(tr '\0' '\n' 2>/dev/null <"/proc/$pid/cmdline") || return 1
  argv0=${cmdline%%$'\n'*}
  [[ ${argv0##*/} == "$name" && $cmdline == *"$dir/"* ]]
}

# Stop the daemon whose pid file is FILE if it is ours; wait for it to exit.
stop_pidfile() {
  local file=$1 name=$2 dir=$3 pid i
  [[ -f $file ]] || return 0
  pid=$(tr -dc '0-9' <"$file")
  if ours "$pid" "$name" "$dir"; then
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
      ours "$pid" "$name" "$dir" || break
      sleep 0.1
    done
    if ours "$pid" "$name" "$dir"; then
      log "$name (pid $pid) ignored SIGTERM for 10 s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$file"
}

# Leftover processes of the cluster in DIR, and all their descendants:
#  - anything started with our marker in its environment (the daemons and
#    their helpers such as slurmscriptd);
#  - slurmstepd processes of this cluster: slurmd clears their environment
#    except SLURM_CONF, which it sets to DIR/slurm.conf.
# The caller's own processes are never matched: they may carry SLURM_CONF but
# are not named slurmstepd and never carry the marker.
leftover_pids() {
  local dir=$1 e pid comm roots=() env
  for e in /proc/[0-9]*/environ; do
    pid=${e#/proc/}; pid=${pid%/environ}
    [[ $pid == "$$" || $pid == "$BASHPID" ]] && continue
    env=$(tr '\0' '\n' 2>/dev/null <"$e") || continue
    comm=$(cat 2>/dev/null "/proc/$pid/comm") || continue
    if grep -qxF "RLHF_SLURM_DAEMON_DIR=$dir" <<<"$env" ||
       { [[ $comm == slurmstepd ]] && grep -qxF "SLURM_CONF=$dir/slurm.conf" <<<"$env"; }; then
      roots+=("$pid")
    fi
  done
  (( ${#roots[@]} )) || return 0
  # Add descendants (job tasks) by walking the ppid links.
  local -A parent=()
  local st rest fields
  for st in /proc/[0-9]*/stat; do
    rest=$(cat 2>/dev/null "$st") || continue
    pid=${rest%% *}
    rest=${rest##*) }        # fields after "(comm) ": state ppid ...
    read -ra fields <<<"$rest"
    parent[$pid]=${fields[1]}
  done
  local -A mine=()
  for pid in "${roots[@]}"; do mine[$pid]=1; done
  local changed=1
  while (( changed )); do
    changed=0
    for pid in "${!parent[@]}"; do
      [[ -n ${mine[$pid]:-} ]] && continue
      if [[ -n ${mine[${parent[$pid]}]:-} ]]; then mine[$pid]=1; changed=1; fi
    done
  done
  unset "mine[$$]" "mine[$BASHPID]"
  echo "${!mine[@]}"
}

tail_logs() {
  local dir=$1 f
  for f in "$dir"/log/munged.log "$dir"/log/slurmctld.log "$dir"/log/slurmd.log; do
    [[ -f $f ]] || continue
    printf '\n==> %s (last 25 lines) <==\n' "$f" >&2
    tail -n 25 "$f" >&2
  done
}

# --- up --------------------------------------------------------------------------

cmd_up() {
  need_root up
  have_all || die "Slurm/munge not installed; run: $0 install"
  local dir=${1:-}
  if [[ -z $dir ]]; then
    dir=$(mktemp -d /tmp/rlhf-slurm.XXXXXX)
  else
    # `down` removes DIR, so only accept a new or empty directory.
    if [[ -e $dir ]]; then
      [[ -d $dir && -z $(ls -A "$dir") ]] || die "$dir exists and is not an empty directory"
    fi
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd -P)
  fi
  echo "created by scripts/slurm-local.sh up; removed by down" >"$dir/$MARKER"
  chmod 0755 "$dir"   # jobs' processes must be able to reach the config
  local t0=$SECONDS
  mkdir -p "$dir"/{log,run,state,spool,munge}
  # munged wants the socket's directory reachable (x) by all, not writable.
  chmod 0755 "$dir/munge"

  # On any failure from here on, show the logs and tear down what we started.
  trap 'rc=$?; if (( rc != 0 )); then tail_logs "'"$dir"'"; log "up failed; cleaning up '"$dir"'"; cmd_down "'"$dir"'" >&2 || true; fi' EXIT

  # -- munge: own key, socket, pid, log, seed (all munge 0.5.15 options) --
  local key=$dir/munge/munge.key sock=$dir/munge/munge.socket
  if command -v mungekey >/dev/null 2>&1; then
    mungekey --create --keyfile="$key" --bits=1024 >&2
  else
    dd if=/dev/urandom of="$key" bs=1 count=1024 status=none
  fi
  chmod 0400 "$key"
  RLHF_SLURM_DAEMON_DIR=$dir munged \
    --socket="$sock" --key-file="$key" --pid-file="$dir/run/munged.pid" \
    --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munge.seed" \
    --force >&2
  # munged clients (sbatch, srun, ...) reach the socket via AuthInfo=socket=.
  local i
  for ((i = 0; i < 50; i++)); do [[ -S $sock ]] && break; sleep 0.1; done
  [[ -S $sock ]] || die "munged did not create $sock"
  munge -S "$sock" -n | unmunge -S "$sock" >/dev/null || die "munge self-test failed"

  # -- slurm.conf --
  local host cpus mem_mb real_mem ctld_port slurmd_port cred_expire
  host=$(hostname -s)
  cpus=${RLHF_SLURM_CPUS:-$(( $(nproc) > 8 ? $(nproc) : 8 ))}
  mem_mb=$(awk '/^MemTotal:/ { print int($2 / 1024) }' /proc/meminfo)
  real_mem=$(( mem_mb * 9 / 10 ))
  cred_expire=${RLHF_SLURM_CRED_EXPIRE:-10}
  read -r ctld_port slurmd_port < <(pick_ports)

  cat >"$dir/slurm.conf" <<EOF
# Generated by scripts/slurm-local.sh up — single-node test cluster on loopback.
# See docs/slurm-local.md for why each setting is what it is.
ClusterName=rlhf-test
SlurmctldHost=${host}(127.0.0.1)
SlurmctldPort=${ctld_port}
SlurmdPort=${slurmd_port}
SlurmUser=root
SlurmdUser=root

# Own munge daemon.  cred_expire (job credential lifetime) also sets how long
# a requeued job waits before it may start again: BeginTime = requeue time +
# cred_expire + 1 s.  Default is 120 s; keep it short for tests.
AuthType=auth/munge
AuthInfo=socket=${sock},cred_expire=${cred_expire}
CryptoType=crypto/munge

StateSaveLocation=${dir}/state
SlurmdSpoolDir=${dir}/spool
SlurmctldPidFile=${dir}/run/slurmctld.pid
SlurmdPidFile=${dir}/run/slurmd.pid
SlurmctldLogFile=${dir}/log/slurmctld.log
SlurmdLogFile=${dir}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info

# No cgroups anywhere: works in containers/VMs without a delegated cgroup tree.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true

# A pending job whose BeginTime has passed (e.g. a requeued one) is only
# picked up by the periodic main/backfill loops (60 s / 30 s by default);
# run them every second so requeued jobs restart promptly.
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# The node may declare more CPUs than it has (see RLHF_SLURM_CPUS).
SlurmdParameters=config_overrides

JobRequeue=1
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=30
MessageTimeout=10
FirstJobId=$(( 1000 + RANDOM % 9000 ))

NodeName=${host} NodeAddr=127.0.0.1 NodeHostname=${host} CPUs=${cpus} RealMemory=${real_mem} State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:8
EOF

  export SLURM_CONF=$dir/slurm.conf

  # -- daemons --
  log "starting slurmctld (port $ctld_port) and slurmd (port $slurmd_port) in $dir"
  RLHF_SLURM_DAEMON_DIR=$dir slurmctld -f "$SLURM_CONF" -i >&2
  RLHF_SLURM_DAEMON_DIR=$dir slurmd -f "$SLURM_CONF" -N "$host" >&2

  local timeout=${RLHF_SLURM_TIMEOUT:-30} state=""
  for ((i = 0; i < timeout * 4; i++)); do
    state=$(sinfo -h -N -n "$host" -o '%T' 2>/dev/null | head -n1 || true)
    [[ $state == idle ]] && break
    sleep 0.25
  done
  if [[ $state != idle ]]; then
    log "node $host not idle after ${timeout}s (state: '${state:-no answer from slurmctld}')"
    sinfo -N -l >&2 2>&1 || true
    exit 1
  fi
  trap - EXIT
  log "cluster up in $(( SECONDS - t0 ))s: node $host idle, $cpus CPUs"
  printf 'export SLURM_CONF=%q\n' "$dir/slurm.conf"
  printf 'export RLHF_SLURM_DIR=%q\n' "$dir"
}

# --- down ------------------------------------------------------------------------

cmd_down() {
  local dir=${1:-${RLHF_SLURM_DIR:-}}
  [[ -n $dir ]] || die "down: no DIR given and RLHF_SLURM_DIR is unset"
  if [[ ! -d $dir ]]; then
    log "$dir does not exist; nothing to do"
    return 0
  fi
  dir=$(cd "$dir" && pwd -P)
  [[ $dir == / ]] && die "refusing to tear down /"
  # Only touch a dir that up made.
  [[ -f $dir/$MARKER ]] || die "$dir was not made by '$PROG up' (no $MARKER); not touching it"
  local conf=$dir/slurm.conf ctld_pid=""
  [[ -f $dir/run/slurmctld.pid ]] && ctld_pid=$(tr -dc '0-9' <"$dir/run/slurmctld.pid")
  if [[ -f $conf ]] && ours "$ctld_pid" slurmctld "$dir"; then
    # Cancel everything and give slurmd a moment to reap the steps.
    SLURM_CONF=$conf scancel --full --quiet --user=root 2>/dev/null || true
    SLURM_CONF=$conf scancel --quiet --state=PENDING 2>/dev/null || true
    local i left
    for ((i = 0; i < 40; i++)); do
      left=$(SLURM_CONF=$conf squeue -h -o '%i' 2>/dev/null | wc -l || echo 0)
      (( left == 0 )) && break
      sleep 0.25
    done
  fi
  stop_pidfile "$dir/run/slurmd.pid" slurmd "$dir"
  stop_pidfile "$dir/run/slurmctld.pid" slurmctld "$dir"
  stop_pidfile "$dir/run/munged.pid" munged "$dir"
  # Leftovers that slurmd spawned for this cluster (slurmstepd, job tasks
  # inheriting the marker); never anything else.
  local pids pid
  pids=$(leftover_pids "$dir")
  if [[ -n $pids ]]; then
    log "killing leftover processes of this cluster: $pids"
    for pid in $pids; do kill -KILL "$pid" 2>/dev/null || true; done
  fi
  rm -rf -- "$dir"
  log "cluster in $dir is down"
}

# --- status ----------------------------------------------------------------------

cmd_status() {
  local dir=${1:-${RLHF_SLURM_DIR:-}}
  local conf=${SLURM_CONF:-}
  [[ -n $dir ]] && conf=$dir/slurm.conf
  [[ -n $conf && -f $conf ]] || die "status: no cluster (give DIR, or set RLHF_SLURM_DIR / SLURM_CONF)"
  SLURM_CONF=$conf sinfo -N -l
  SLURM_CONF=$conf squeue -l
}

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
}

case ${1:-} in
  install) shift; cmd_install "$@" ;;
  up) shift; cmd_up "$@" ;;
  down) shift; cmd_down "$@" ;;
  status) shift; cmd_status "$@" ;;
  -h | --help | help) usage ;;
  *) usage; exit 2 ;;
esac
