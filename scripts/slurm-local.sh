#!/usr/bin/env bash
# slurm-local.sh — a real Slurm cluster on this one machine, for tests and for
# developers: single-node on loopback, or multi-node with one network
# namespace per node.  Uses Debian 12's packages (slurm-wlm 22.05, munge 0.5.15).
#
#   scripts/slurm-local.sh install          # apt-get install slurm-wlm munge (root)
#   eval "$(scripts/slurm-local.sh up)"     # start; prints `export SLURM_CONF=...`
#   eval "$(scripts/slurm-local.sh up --nodes 3)"   # 3 nodes, own netns each
#   scripts/slurm-local.sh status           # sinfo + squeue
#   scripts/slurm-local.sh down             # stop our daemons, remove the dir
#
# `up [--nodes N] [DIR]`
#              everything (config, munge key/socket, state, spool, logs, pids)
#              lives under DIR (default: a fresh mktemp -d /tmp/rlhf-slurm.XXXXXX).
#              stdout carries only `export` lines; all else goes to stderr.
#              Without --nodes: one node named $(hostname -s) on 127.0.0.1.
#              With --nodes N (1..200): a bridge with its own 10.x.y.0/24 in the
#              root namespace (slurmctld on 10.x.y.1), and per node a network +
#              UTS namespace with its own host name rn<ID>-<i> (ID: 4 random
#              letters per cluster), address 10.x.y.(10+i) and /etc/hosts,
#              running its own slurmd.  Partitions debug (default) and high
#              (preempts debug).  Also exports RLHF_SLURM_NODES
#              and RLHF_SLURM_NODE_ADDRS (comma-separated, in node order) and
#              RLHF_SLURM_HOST_ADDR (10.x.y.1: the root namespace as nodes
#              reach it, also by the name $(hostname -s)).
# `down [DIR]` DIR defaults to $RLHF_SLURM_DIR.  Cancels all jobs, stops only
#              the daemons this script started for DIR (pid files, checked
#              against /proc/PID/cmdline), kills the cluster's leftover
#              processes, removes its namespaces, veths, bridge and
#              /etc/netns entries, then DIR.  Idempotent.
# `status [DIR]`
# `link NODE down|up [--raw] [DIR]`  (multi-node) set the node's only interface
#              (eth0 in its namespace) down or up: the node loses / regains
#              its network; its processes keep running.  `up` also makes the
#              node's slurmd register at once and, if slurmctld had set the
#              node DOWN, keeps it drained until the stale steps are gone
#              (--raw: only the link).  DIR defaults to the cluster that
#              has NODE.
# `exec NODE CMD [ARG...]`    (multi-node) run CMD in NODE's network
#              namespace, with its host name and /etc/hosts.
#
# Environment knobs for `up`:
#   RLHF_SLURM_CPUS     CPUs to declare for each node (default: max(nproc, 8)).
#                       More than the physical count is fine: slurmd is run
#                       with SlurmdParameters=config_overrides.
#   RLHF_SLURM_TIMEOUT  seconds to wait for the node(s) to be idle (default 30).
#   RLHF_SLURM_CRED_EXPIRE  job credential lifetime in s (default 10); also
#                       the delay before a requeued job may start again.
#   RLHF_SLURM_SLURMD_TIMEOUT  SlurmdTimeout in s (default 30): how long a
#                       silent node stays up before slurmctld sets it DOWN.
# Multi-node only (partitions `debug`, default, PriorityTier=1, and `high`,
# PriorityTier=10; PreemptType=preempt/partition_prio, PreemptMode=REQUEUE):
#   RLHF_SLURM_GRACE_TIME  GraceTime of the debug partition in s (default 30;
#                       0 = preempted jobs are requeued at once).
#   RLHF_SLURM_PREEMPT_USER_SIGNAL=1  adds
#                       SlurmctldParameters=preempt_send_user_signal.
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
  for f in "$dir"/log/munged.log "$dir"/log/slurmctld.log "$dir"/log/slurmd*.log; do
    [[ -f $f ]] || continue
    printf '\n==> %s (last 25 lines) <==\n' "$f" >&2
    tail -n 25 "$f" >&2
  done
}

# A whole number >= MIN, from knob NAME (for the error message).
check_int() {
  local name=$1 val=$2 min=$3
  if [[ ! $val =~ ^[0-9]+$ ]] || (( 10#$val < min )); then
    die "$name must be an integer >= $min (got '$val')"
  fi
}

# --- multi-node: names and network ---------------------------------------------
#
# A cluster made with `up --nodes N` has an ID of 4 random lowercase letters,
# recorded in DIR/cluster.env, and every name it creates is derived from it,
# so two clusters never share a name and `down` only touches its own:
#   node i:   host name rn<ID>-<i>, netns rlhf-<ID>-<i>, /etc/netns/rlhf-<ID>-<i>/,
#             host-side veth rlv-<ID>-<i> (eth0 inside the namespace)
#   bridge:   rlbr-<ID>
# Interface names must stay within 15 characters (IFNAMSIZ): rlv-abcd-200 is 12.

CLUSTER_ENV=cluster.env
MAX_NODES=200

node_name() { echo "rn$1-$2"; }     # ID i
node_ns() { echo "rlhf-$1-$2"; }    # ID i
node_veth() { echo "rlv-$1-$2"; }   # ID i
bridge_name() { echo "rlbr-$1"; }   # ID

# Value of KEY in DIR/cluster.env (a plain KEY=VALUE file written by up).
cluster_get() {
  local dir=$1 key=$2
  sed -n "s/^$key=//p" "$dir/$CLUSTER_ENV" 2>/dev/null | head -n1
}

# An ID no live netns, link or other cluster dir uses.
pick_net_id() {
  local id tries letters=abcdefghijklmnopqrstuvwxyz netns
  netns=$(ip netns list 2>/dev/null | awk '{print $1}')
  for ((tries = 0; tries < 200; tries++)); do
    id=""
    while (( ${#id} < 4 )); do id+=${letters:RANDOM % 26:1}; done
    grep -q "^rlhf-$id-" <<<"$netns" && continue
    ip link show "$(bridge_name "$id")" >/dev/null 2>&1 && continue
    grep -qsx "NET_ID=$id" /tmp/rlhf-slurm.*/"$CLUSTER_ENV" && continue
    echo "$id"
    return 0
  done
  die "could not find an unused cluster ID"
}

ip2int() {
  local a b c d
  IFS=. read -r a b c d <<<"$1"
  echo $(( (a << 24) | (b << 16) | (c << 8) | d ))
}

# IPv4 networks (a.b.c.d[/len]) this host already uses: its addresses, its
# routes in every table, its name servers, and the subnets of other
# rlhf-slurm clusters (which may not have made their bridge yet).
used_cidrs() {
  awk '$1 == "nameserver" && $2 ~ /^[0-9.]+$/ {print $2}' /etc/resolv.conf 2>/dev/null || true
  ip -4 -o addr show 2>/dev/null | awk '{print $4}'
  ip -4 route show table all 2>/dev/null | awk '$1 ~ /^[0-9.]+(\/[0-9]+)?$/ {print $1}'
  sed -n 's/^NET_PREFIX=\(.*\)/\1.0\/24/p' /tmp/rlhf-slurm.*/"$CLUSTER_ENV" 2>/dev/null || true
}

# Print "10.x.y" such that 10.x.y.0/24 overlaps nothing in used_cidrs.
pick_subnet() {
  local used cidr net len mask cand tries ok
  used=$(used_cidrs)
  for ((tries = 0; tries < 500; tries++)); do
    cand="10.$(( 200 + RANDOM % 50 )).$(( RANDOM % 256 ))"
    ok=1
    while read -r cidr; do
      [[ -n $cidr ]] || continue
      net=${cidr%/*}
      len=32; [[ $cidr == */* ]] && len=${cidr#*/}
      (( len > 24 )) && len=24          # compare on the shorter prefix
      mask=$(( len == 0 ? 0 : (0xffffffff << (32 - len)) & 0xffffffff ))
      if (( ($(ip2int "$net") & mask) == ($(ip2int "$cand.0") & mask) )); then ok=0; break; fi
    done <<<"$used"
    (( ok )) && { echo "$cand"; return 0; }
  done
  die "no free 10.x.y.0/24 found"
}

# Create the bridge, and per node a netns with a veth on the bridge, its
# address, a default route via the bridge address, and the files
# /etc/netns/NS/{hosts,hostname,resolv.conf}.  in_node (like `ip netns exec`)
# bind-mounts them over /etc, so everything started in a node (slurmd and all
# it spawns) resolves every node name, its own included, to its 10.x.y
# address, never to 127.x.
net_up() {
  local id=$1 prefix=$2 n=$3 ctl_name=$4 br i ns veth hosts
  br=$(bridge_name "$id")
  ip link add "$br" type bridge
  # Keep bridged traffic out of the host's iptables (br_netfilter), if loaded.
  ip link set "$br" type bridge nf_call_iptables 0 nf_call_ip6tables 0 2>/dev/null || true
  ip addr add "$prefix.1/24" dev "$br"
  ip link set "$br" up

  hosts=$(printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n%s\t%s\n' \
    "$prefix.1" "$ctl_name")
  for ((i = 1; i <= n; i++)); do
    hosts+=$(printf '\n%s\t%s' "$prefix.$(( 10 + i ))" "$(node_name "$id" "$i")")
  done

  for ((i = 1; i <= n; i++)); do
    ns=$(node_ns "$id" "$i")
    veth=$(node_veth "$id" "$i")
    ip netns add "$ns"
    ip link add "$veth" type veth peer name eth0 netns "$ns"
    ip link set "$veth" master "$br" up
    ip -n "$ns" link set lo up
    ip -n "$ns" addr add "$prefix.$(( 10 + i ))/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" route add default via "$prefix.1"
    mkdir -p "/etc/netns/$ns"
    printf '%s\n' "$hosts" >"/etc/netns/$ns/hosts"
    node_name "$id" "$i" >"/etc/netns/$ns/hostname"
    # The host's name servers are unreachable from a node (nothing routes
    # beyond the bridge), so every lookup that falls through to DNS (e.g.
    # `getent hosts NAME` asks for IPv6 first) would wait 2 x 5 s.  Point DNS
    # at the node's own loopback, where nothing listens: instant refusal.
    printf 'nameserver 127.0.0.1\noptions timeout:1 attempts:1\n' >"/etc/netns/$ns/resolv.conf"
  done
}

# Undo net_up for cluster ID with N nodes; anything already gone is skipped.
# Processes still in a node's netns are this cluster's by construction
# (slurmd, slurmstepd, job tasks, `exec` commands): kill them first, or the
# namespace would outlive `ip netns del`.
net_down() {
  local id=$1 n=$2 i ns veth pids pid
  [[ $id =~ ^[a-z]{4}$ && $n =~ ^[0-9]+$ ]] || { log "bad cluster.env (NET_ID='$id' NODE_COUNT='$n'); network not removed"; return 0; }
  for ((i = 1; i <= n; i++)); do
    ns=$(node_ns "$id" "$i")
    veth=$(node_veth "$id" "$i")
    if [[ -e /run/netns/$ns ]]; then
      pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
      if [[ -n ${pids// /} ]]; then
        log "killing processes left in $ns: $pids"
        for pid in $pids; do kill -KILL "$pid" 2>/dev/null || true; done
      fi
      ip netns del "$ns" 2>/dev/null || log "could not delete netns $ns"
    fi
    ip link del "$veth" 2>/dev/null || true
    rm -rf -- "/etc/netns/$ns"
  done
  ip link del "$(bridge_name "$id")" 2>/dev/null || true
  rmdir /etc/netns 2>/dev/null || true   # only if no one else uses it
}

# Run CMD [ARG...] as node NODE: in netns NS, in a new UTS namespace whose host
# name is NODE, and in a new mount namespace where each file of /etc/netns/NS
# is bind-mounted over the same name in /etc.  That is what `ip netns exec NS`
# does, minus its remount of /sys: the fresh sysfs lacks /sys/fs/cgroup, and
# slurmd 22.05 then refuses to start ("Unable to initialize cgroup plugin")
# even with proctrack/linuxproc.  Propagation `slave` as in ip netns exec:
# later mounts in the root namespace still show up in the node.
in_node() {
  local ns=$1 node=$2
  shift 2
  # shellcheck disable=SC2016  # $1.. are the inner sh's arguments
  nsenter --net="/run/netns/$ns" -- unshare --mount --uts --propagation slave -- sh -c '
    for f in "/etc/netns/$1"/*; do
      mount --bind "$f" "/etc/${f##*/}" || exit 1
    done
    hostname "$2" && shift 2 && exec "$@"' sh "$ns" "$node" "$@"
}

# The netns of NODE (rn<ID>-<i>); dies if it does not exist.
node_netns() {
  local node=$1 ns
  [[ $node =~ ^rn([a-z]{4})-([0-9]+)$ ]] || die "'$node' is not a multi-node node name (rn<ID>-<i>)"
  ns=$(node_ns "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}")
  [[ -e /run/netns/$ns ]] || die "no network namespace $ns for node $node (cluster down?)"
  echo "$ns"
}

# The DIR of the cluster that NODE belongs to: DIR if given (NODE must be
# one of its nodes), else $RLHF_SLURM_DIR or a /tmp/rlhf-slurm.* whose
# cluster.env lists NODE; empty if none does.
node_cluster_dir() {
  local node=$1 dir=${2:-} d
  if [[ -n $dir ]]; then
    [[ ,$(cluster_get "$dir" NODES), == *",$node,"* ]] || die "$node is not a node of the cluster in $dir"
    (cd "$dir" && pwd -P)
    return 0
  fi
  for d in ${RLHF_SLURM_DIR:+"$RLHF_SLURM_DIR"} /tmp/rlhf-slurm.*; do
    [[ -f $d/$CLUSTER_ENV ]] || continue
    if [[ ,$(cluster_get "$d" NODES), == *",$node,"* ]]; then
      echo "$d"
      return 0
    fi
  done
}

# PIDs of processes called NAME (comm) in netns NS.
ns_pids_named() {
  local ns=$1 name=$2 pid out=""
  for pid in $(ip netns pids "$ns" 2>/dev/null); do
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]] && out+="$pid "
  done
  echo "${out% }"
}

# --- up --------------------------------------------------------------------------

cmd_up() {
  need_root up
  have_all || die "Slurm/munge not installed; run: $0 install"
  local dir="" nodes=""
  while (( $# )); do
    case $1 in
      --nodes) (( $# >= 2 )) || die "up: --nodes needs a number"; nodes=$2; shift 2 ;;
      --nodes=*) nodes=${1#--nodes=}; shift ;;
      -*) die "up: unknown option $1" ;;
      *) [[ -z $dir ]] || die "up: more than one DIR given"; dir=$1; shift ;;
    esac
  done
  if [[ -n $nodes ]]; then
    check_int --nodes "$nodes" 1
    (( 10#$nodes <= MAX_NODES )) || die "--nodes must be <= $MAX_NODES"
    nodes=$(( 10#$nodes ))
    local b
    for b in ip unshare nsenter; do
      command -v "$b" >/dev/null 2>&1 || die "multi-node mode needs $b (iproute2, util-linux)"
    done
  fi
  # Check the knobs before starting anything.
  local slurmd_timeout=${RLHF_SLURM_SLURMD_TIMEOUT:-30}
  local grace=${RLHF_SLURM_GRACE_TIME:-30}
  check_int RLHF_SLURM_SLURMD_TIMEOUT "$slurmd_timeout" 1
  [[ -n $nodes ]] && check_int RLHF_SLURM_GRACE_TIME "$grace" 0

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
  # Its socket is a file under DIR, so processes in node namespaces (which
  # share the root mount tree) reach it too.
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
  export SLURM_CONF=$dir/slurm.conf

  if [[ -z $nodes ]]; then
    up_single
  else
    up_multi
  fi
  trap - EXIT
}

# Settings shared by both modes (the single-node slurm.conf is exactly the
# header, this block and its node/partition lines).
conf_common() {
  cat <<EOF
# Own munge daemon.  cred_expire (job credential lifetime) also sets how long
# a requeued job waits before it may start again: BeginTime = requeue time +
# cred_expire + 1 s.  Default is 120 s; keep it short for tests.
AuthType=auth/munge
AuthInfo=socket=${sock},cred_expire=${cred_expire}
CryptoType=crypto/munge

StateSaveLocation=${dir}/state
SlurmdSpoolDir=${spool}
SlurmctldPidFile=${dir}/run/slurmctld.pid
SlurmdPidFile=${slurmd_pid}
SlurmctldLogFile=${dir}/log/slurmctld.log
SlurmdLogFile=${slurmd_log}
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
SlurmdTimeout=${slurmd_timeout}
InactiveLimit=0
KillWait=5
MinJobAge=30
MessageTimeout=10
FirstJobId=$(( 1000 + RANDOM % 9000 ))
EOF
}

# Wait until sinfo shows every node in the comma-separated list idle.
wait_idle() {
  local want=$1 timeout=${RLHF_SLURM_TIMEOUT:-30} i idle n states=""
  n=$(tr ',' '\n' <<<"$want" | grep -c .)
  for ((i = 0; i < timeout * 4; i++)); do
    states=$(sinfo -h -N -n "$want" -o '%N %T' 2>/dev/null || true)
    idle=$(awk '$2 == "idle"' <<<"$states" | sort -u | grep -c . || true)
    (( idle == n )) && return 0
    sleep 0.25
  done
  log "nodes not all idle after ${timeout}s; sinfo says: ${states:-no answer from slurmctld}"
  sinfo -N -l >&2 2>&1 || true
  return 1
}

# Single-node mode (no --nodes): one slurmd named $(hostname -s) on loopback.
# Uses cmd_up's locals.
up_single() {
  local spool=$dir/spool slurmd_pid=$dir/run/slurmd.pid slurmd_log=$dir/log/slurmd.log
  {
    cat <<EOF
# Generated by scripts/slurm-local.sh up — single-node test cluster on loopback.
# See docs/slurm-local.md for why each setting is what it is.
ClusterName=rlhf-test
SlurmctldHost=${host}(127.0.0.1)
SlurmctldPort=${ctld_port}
SlurmdPort=${slurmd_port}
SlurmUser=root
SlurmdUser=root

EOF
    conf_common
    cat <<EOF

NodeName=${host} NodeAddr=127.0.0.1 NodeHostname=${host} CPUs=${cpus} RealMemory=${real_mem} State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:8
EOF
  } >"$dir/slurm.conf"

  # -- daemons --
  log "starting slurmctld (port $ctld_port) and slurmd (port $slurmd_port) in $dir"
  RLHF_SLURM_DAEMON_DIR=$dir slurmctld -f "$SLURM_CONF" -i >&2
  RLHF_SLURM_DAEMON_DIR=$dir slurmd -f "$SLURM_CONF" -N "$host" >&2

  wait_idle "$host" || exit 1
  log "cluster up in $(( SECONDS - t0 ))s: node $host idle, $cpus CPUs"
  printf 'export SLURM_CONF=%q\n' "$dir/slurm.conf"
  printf 'export RLHF_SLURM_DIR=%q\n' "$dir"
}

# Multi-node mode (--nodes N).  Uses cmd_up's locals.
up_multi() {
  local id prefix names="" addrs="" node ns
  id=$(pick_net_id)
  prefix=$(pick_subnet)
  for ((i = 1; i <= nodes; i++)); do
    names+=${names:+,}$(node_name "$id" "$i")
    addrs+=${addrs:+,}$prefix.$(( 10 + i ))
  done
  # Written before anything is created, so a failed `up` (whose EXIT trap
  # runs `down`) removes whatever part of the network exists.
  cat >"$dir/$CLUSTER_ENV" <<EOF
MODE=multi
NET_ID=$id
NET_PREFIX=$prefix
NODE_COUNT=$nodes
NODES=$names
NODE_ADDRS=$addrs
BRIDGE=$(bridge_name "$id")
EOF
  log "network: bridge $(bridge_name "$id") $prefix.1/24; nodes $names at $addrs"
  net_up "$id" "$prefix" "$nodes" "$host"

  # Slurm expands %n to the node name (slurmd -N) in these three paths, so
  # all slurmds share one slurm.conf.
  local spool=$dir/spool/%n slurmd_pid=$dir/run/slurmd-%n.pid slurmd_log=$dir/log/slurmd-%n.log
  local user_signal=""
  [[ ${RLHF_SLURM_PREEMPT_USER_SIGNAL:-0} == 1 ]] && user_signal="SlurmctldParameters=preempt_send_user_signal"
  {
    cat <<EOF
# Generated by scripts/slurm-local.sh up --nodes $nodes — $nodes nodes, one
# network namespace each, on bridge $(bridge_name "$id") ($prefix.0/24).
# See docs/slurm-local.md for why each setting is what it is.
ClusterName=rlhf-test
SlurmctldHost=${host}(${prefix}.1)
SlurmctldPort=${ctld_port}
# Every slurmd listens on this port inside its own network namespace.
SlurmdPort=${slurmd_port}
SlurmUser=root
SlurmdUser=root

EOF
    conf_common
    cat <<EOF

# Preemption drill: a job in \`high\` that needs resources held by jobs in
# \`debug\` preempts them.  The preempted job's step tasks get SIGTERM at once,
# everything (batch shell too) gets SIGTERM when the debug partition's
# GraceTime ends, SIGKILL KillWait later, and the job is requeued.
# OverSubscribe=NO: with FORCE, Slurm ignores --exclusive and a high job just
# shares the CPUs instead of preempting.  Steps of one job still run at once
# with srun --overlap.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
${user_signal:-# SlurmctldParameters=preempt_send_user_signal (RLHF_SLURM_PREEMPT_USER_SIGNAL=1)}

EOF
    for ((i = 1; i <= nodes; i++)); do
      node=$(node_name "$id" "$i")
      echo "NodeName=$node NodeAddr=$prefix.$(( 10 + i )) NodeHostname=$node CPUs=${cpus} RealMemory=${real_mem} State=UNKNOWN"
    done
    cat <<EOF
PartitionName=debug Nodes=${names} Default=YES PriorityTier=1 GraceTime=${grace} MaxTime=INFINITE State=UP OverSubscribe=NO
PartitionName=high Nodes=${names} PriorityTier=10 MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  } >"$dir/slurm.conf"

  # -- daemons --
  log "starting slurmctld on $prefix.1:$ctld_port and $nodes slurmds (port $slurmd_port) in $dir"
  RLHF_SLURM_DAEMON_DIR=$dir slurmctld -f "$SLURM_CONF" -i >&2
  for ((i = 1; i <= nodes; i++)); do
    node=$(node_name "$id" "$i")
    ns=$(node_ns "$id" "$i")
    mkdir -p "$dir/spool/$node"
    # slurmd and all it starts (slurmstepd, batch scripts, srun, tasks)
    # inherit the node's network, UTS (host name) and mount (hosts file)
    # namespaces.
    RLHF_SLURM_DAEMON_DIR=$dir in_node "$ns" "$node" slurmd -f "$SLURM_CONF" -N "$node" >&2
  done

  wait_idle "$names" || exit 1
  log "cluster up in $(( SECONDS - t0 ))s: $nodes nodes idle ($names at $addrs), $cpus CPUs each"
  printf 'export SLURM_CONF=%q\n' "$dir/slurm.conf"
  printf 'export RLHF_SLURM_DIR=%q\n' "$dir"
  printf 'export RLHF_SLURM_NODES=%s\n' "$names"   # [a-z0-9,-]: no quoting needed
  printf 'export RLHF_SLURM_NODE_ADDRS=%s\n' "$addrs"
  printf 'export RLHF_SLURM_HOST_ADDR=%s\n' "$prefix.1"
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
  # slurmd.pid (single-node) or slurmd-NODE.pid (multi-node).
  local f
  for f in "$dir"/run/slurmd.pid "$dir"/run/slurmd-*.pid; do
    [[ -f $f ]] && stop_pidfile "$f" slurmd "$dir"
  done
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
  # Multi-node: whatever is left in the node namespaces, then the network.
  if [[ -f $dir/$CLUSTER_ENV ]]; then
    net_down "$(cluster_get "$dir" NET_ID)" "$(cluster_get "$dir" NODE_COUNT)"
  fi
  rm -rf -- "$dir"
  log "cluster in $dir is down"
}

# --- status, link, exec ----------------------------------------------------------

cmd_status() {
  local dir=${1:-${RLHF_SLURM_DIR:-}}
  local conf=${SLURM_CONF:-}
  [[ -n $dir ]] && conf=$dir/slurm.conf
  [[ -n $conf && -f $conf ]] || die "status: no cluster (give DIR, or set RLHF_SLURM_DIR / SLURM_CONF)"
  SLURM_CONF=$conf sinfo -N -l
  SLURM_CONF=$conf squeue -l
}

# link NODE down|up [--raw] [DIR]: cut or restore NODE's network.  Inside the
# node's namespace eth0 is its only link to the bridge (slurmctld and the other
# nodes); its processes keep running, cut off.
#
# `up` restores the link and the default route (the kernel drops it with the
# link), and then, unless --raw, makes the node usable again at once:
#  - slurmctld never pings a DOWN+NOT_RESPONDING node; it only asks it to
#    register every 20 ping intervals (20 x SlurmdTimeout/3 s), so SIGHUP the
#    node's slurmd, which makes it register now (as a restarted slurmd would).
#  - On registration slurmctld kills the job steps it no longer expects there
#    (the jobs it requeued when the node went DOWN) and returns the node to
#    service (ReturnToService=2).  If a requeued job that wants this node is
#    eligible then, it is launched there within a second, while the stale
#    steps of its previous run are still exiting: slurmd refuses ("Job N
#    already running"), slurmctld drains the node ("Duplicate jobid") and
#    holds the job (launch_failed_requeued_held).  So a node that is DOWN is
#    drained first, and resumed once it has registered and no slurmstepd is
#    left in its namespace.
cmd_link() {
  need_root link
  local node="" what="" dir="" raw=0 a
  for a in "$@"; do
    case $a in
      --raw) raw=1 ;;
      -*) die "link: unknown option $a" ;;
      *)
        if [[ -z $node ]]; then node=$a
        elif [[ -z $what ]]; then what=$a
        elif [[ -z $dir ]]; then dir=$a
        else die "usage: $PROG link NODE down|up [--raw] [DIR]"
        fi ;;
    esac
  done
  [[ -n $node && ( $what == down || $what == up ) ]] || die "usage: $PROG link NODE down|up [--raw] [DIR]"
  local ns gw
  ns=$(node_netns "$node")
  dir=$(node_cluster_dir "$node" "$dir")
  if [[ $what == down ]]; then
    ip -n "$ns" link set eth0 down
    log "node $node: eth0 down"
    return 0
  fi

  local conf=$dir/slurm.conf state="" fence=0
  if (( ! raw )) && [[ -n $dir ]]; then
    state=$(SLURM_CONF=$conf scontrol show node -o "$node" 2>/dev/null | grep -o 'State=[^ ]*' || true)
    if [[ $state == *DOWN* ]]; then
      SLURM_CONF=$conf scontrol update NodeName="$node" State=DRAIN \
        Reason="slurm-local.sh link up: waiting for stale steps" >&2
      fence=1
    fi
  fi
  ip -n "$ns" link set eth0 up
  # The bridge address: the first address on eth0 with its last octet 1.
  gw=$(ip -n "$ns" -4 -o addr show dev eth0 | awk '{split($4, a, "/"); split(a[1], o, "."); print o[1] "." o[2] "." o[3] ".1"; exit}')
  [[ -n $gw ]] && ip -n "$ns" route replace default via "$gw"
  if (( raw )) || [[ -z $dir ]]; then
    [[ -z $dir ]] && (( ! raw )) && log "no cluster dir found for $node; only the link was restored"
    log "node $node: eth0 up"
    return 0
  fi

  local pid i stale
  pid=$(tr -dc '0-9' <"$dir/run/slurmd-$node.pid" 2>/dev/null || true)
  if ours "$pid" slurmd "$dir"; then
    kill -HUP "$pid"
  else
    log "slurmd of $node is not running; not asking it to register"
  fi
  if (( fence )); then
    for ((i = 0; i < 120; i++)); do
      state=$(SLURM_CONF=$conf scontrol show node -o "$node" 2>/dev/null | grep -o 'State=[^ ]*' || true)
      stale=$(ns_pids_named "$ns" slurmstepd)
      [[ $state != *NOT_RESPONDING* && -z $stale ]] && break
      sleep 0.25
    done
    [[ -n $stale ]] && log "slurmstepd still running on $node after 30 s: $stale; resuming anyway"
    SLURM_CONF=$conf scontrol update NodeName="$node" State=RESUME >&2
    # RESUME marks the node NOT_RESPONDING until its next ping (< 1 s).
    for ((i = 0; i < 40; i++)); do
      state=$(SLURM_CONF=$conf scontrol show node -o "$node" 2>/dev/null | grep -o 'State=[^ ]*' || true)
      [[ $state != *NOT_RESPONDING* ]] && break
      sleep 0.25
    done
  fi
  log "node $node: eth0 up; $(SLURM_CONF=$conf scontrol show node -o "$node" 2>/dev/null | grep -o 'State=[^ ]*' || true)"
}

# exec NODE CMD...: run CMD as if on NODE (its netns, its host name, its
# /etc/hosts), in fresh UTS and mount namespaces set up like slurmd's.
cmd_exec() {
  need_root exec
  (( $# >= 2 )) || die "usage: $PROG exec NODE CMD [ARG...]"
  local node=$1 ns
  shift
  ns=$(node_netns "$node")
  in_node "$ns" "$node" "$@"
}

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
}

case ${1:-} in
  install) shift; cmd_install "$@" ;;
  up) shift; cmd_up "$@" ;;
  down) shift; cmd_down "$@" ;;
  status) shift; cmd_status "$@" ;;
  link) shift; cmd_link "$@" ;;
  exec) shift; cmd_exec "$@" ;;
  -h | --help | help) usage ;;
  *) usage; exit 2 ;;
esac
