#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, for tests and CI.
#
# Usage:
#   eval "$(scripts/slurm/local_cluster.sh start)"   # prints: export SLURM_CONF=<dir>/etc/slurm.conf
#   srun -n2 hostname; sbatch --wait ...              # talks to the local cluster
#   scripts/slurm/local_cluster.sh status             # exit 0 running, 3 stopped/partial
#   scripts/slurm/local_cluster.sh stop               # stops only the daemons recorded by start
#
# start: installs slurm-wlm + munge with apt-get if missing (exit 77 with a one-line reason when
#   it cannot: not root, no apt-get, apt failed), writes a private munge key, slurm.conf, state,
#   spool and log dirs under the state dir, starts munged (as user munge), slurmctld and slurmd in
#   the foreground of their own sessions, records their PIDs in <dir>/pids/, and waits (bounded)
#   until the node is idle and `srun -n2 hostname` works. Reuses a cluster this script started
#   earlier when all three recorded daemons are alive. stdout is only what `eval` needs: the
#   `export SLURM_CONF=...` line and a comment `# local_cluster: started` (or `reused`), which
#   tells a caller whether it owns the cluster; progress and errors go to stderr.
#
# Where clients find the cluster: nothing is written to /etc/slurm (a system Slurm, if any, is
#   left alone). srun/sbatch/sinfo/scontrol find this cluster through SLURM_CONF, which sbatch
#   exports into batch jobs, so srun inside a job finds it too. munged listens on a private
#   socket (<dir>/munge-run/munge.socket.2, named by AuthInfo in slurm.conf), so another munged on
#   the default socket is neither used nor disturbed.
#
# Environment:
#   MAGCACHE_SLURM_DIR      state dir (default /tmp/magcache-slurm)
#   MAGCACHE_SLURM_PORT     slurmctld port (default 6817); slurmd uses PORT+1
#   MAGCACHE_SLURM_CPUS     CPUs the node advertises (default: max(nproc, 4), so 4-rank CPU tests
#                           can run on a 2-core machine; SlurmdParameters=config_overrides)
#   MAGCACHE_SLURM_TIMEOUT  seconds to wait for the cluster to become usable (default 60)
set -euo pipefail

DIR="${MAGCACHE_SLURM_DIR:-/tmp/magcache-slurm}"
PORT="${MAGCACHE_SLURM_PORT:-6817}"
TIMEOUT="${MAGCACHE_SLURM_TIMEOUT:-60}"
CONF="$DIR/etc/slurm.conf"
SOCK="$DIR/munge-run/munge.socket.2"
PIDS="$DIR/pids"
DAEMONS=(munged slurmctld slurmd)
LAUNCHED=()  # daemons this run of start has launched so far
NODE="$(hostname -s)"
export SLURM_CONF="$CONF"

say() { echo "[local_cluster] $*" >&2; }
die() { echo "local_cluster.sh: $*" >&2; exit 1; }
skip() { echo "local_cluster.sh: $*" >&2; exit 77; }

usage() {
  echo "usage: $0 {start|stop|status}   (state dir: \$MAGCACHE_SLURM_DIR, default /tmp/magcache-slurm)" >&2
  exit 2
}

# pid of a recorded daemon if it is alive and still that program (guards against PID reuse).
alive_pid() {
  local name="$1" pid
  [ -f "$PIDS/$name" ] || return 1
  pid="$(cat "$PIDS/$name")"
  [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] || return 1
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] || return 1
  [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ] || return 1  # exited, not reaped yet
  echo "$pid"
}

all_alive() {
  local d
  for d in "${DAEMONS[@]}"; do alive_pid "$d" >/dev/null || return 1; done
}

log_tails() {
  local f
  for f in "$DIR"/log/*.log "$DIR"/log/*.out; do
    [ -f "$f" ] || continue
    echo "--- tail $f" >&2
    tail -n 8 "$f" >&2
  done
}

have_binaries() {
  local b
  for b in munged slurmctld slurmd srun sbatch sinfo scontrol squeue scancel; do
    command -v "$b" >/dev/null 2>&1 || return 1
  done
  id munge >/dev/null 2>&1
}

ensure_installed() {
  have_binaries && return 0
  [ "$(id -u)" = 0 ] || skip "slurm-wlm/munge are not installed and we are not root: run 'apt-get install -y slurm-wlm munge' as root, then retry"
  command -v apt-get >/dev/null 2>&1 || skip "slurm-wlm/munge are not installed and there is no apt-get: install Slurm and munge by hand, then retry"
  mkdir -p "$DIR/log"
  local log="$DIR/log/apt.log" added_policy=0
  # Keep package scripts from starting system-wide munge/slurm services we did not ask for.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && added_policy=1
  fi
  say "installing slurm-wlm + munge with apt-get (log: $log)"
  local ok=0
  export DEBIAN_FRONTEND=noninteractive
  if apt-get install -y -q --no-install-recommends slurm-wlm munge >"$log" 2>&1; then
    ok=1
  elif apt-get update -q >>"$log" 2>&1 \
      && apt-get install -y -q --no-install-recommends slurm-wlm munge >>"$log" 2>&1; then
    ok=1
  fi
  [ "$added_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
  [ "$ok" = 1 ] || skip "apt-get could not install slurm-wlm + munge (no network or no Debian repo?): see $log"
  have_binaries || skip "slurm-wlm + munge installed but binaries or the munge user are missing: see $log"
}

write_config() {
  mkdir -p "$DIR/etc" "$DIR/log" "$PIDS" "$DIR/run" "$DIR/spool/ctld" "$DIR/spool/d" \
           "$DIR/munge" "$DIR/munge-run"
  chmod 755 "$DIR" "$DIR/etc"
  # munged refuses keys and sockets in dirs others can write; both dirs belong to user munge.
  chown munge:munge "$DIR/munge" "$DIR/munge-run"
  chmod 700 "$DIR/munge"
  chmod 755 "$DIR/munge-run"
  if [ ! -s "$DIR/munge/munge.key" ]; then
    head -c 1024 /dev/urandom > "$DIR/munge/munge.key"
  fi
  chown munge:munge "$DIR/munge/munge.key"
  chmod 400 "$DIR/munge/munge.key"

  local cpus mem_mb
  cpus="${MAGCACHE_SLURM_CPUS:-$(( $(nproc) > 4 ? $(nproc) : 4 ))}"
  mem_mb="$(awk '/^MemTotal:/ { m = int($2 / 1024) - 512; print (m < 1024 ? 1024 : m) }' /proc/meminfo)"
  # the one template (tests/netns_slurm.py fills it too); ${NAME} placeholders, filled by the shell
  HEADER="Written by scripts/slurm/local_cluster.sh: one-node test cluster, all state under $DIR." \
  CLUSTER=magcache CTLD_HOST="$NODE" CTLD_PORT="$PORT" SLURMD_PORT="$((PORT + 1))" MUNGE_SOCKET="$SOCK" \
  STATE_DIR="$DIR" SLURMD_SPOOL=d PER_NODE="" PARTITION_NODES="$NODE" \
  NODES="NodeName=$NODE CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN" \
    render_template "$(dirname "${BASH_SOURCE[0]}")/slurm.conf.template" > "$CONF.tmp"
  mv "$CONF.tmp" "$CONF"
  chmod 644 "$CONF"
}

# Print a template with its ${NAME} placeholders filled from the environment (no command runs).
render_template() {
  local text
  text="$(cat "$1")"
  eval "cat <<__TEMPLATE__
$text
__TEMPLATE__"
}

# Start one daemon in the foreground of its own session; record its PID.
launch() {
  local name="$1"; shift
  # fd 9 is the start lock: the daemon must not keep holding it.
  setsid "$@" </dev/null >>"$DIR/log/$name.out" 2>&1 9>&- &
  local pid=$!
  echo "$pid" > "$PIDS/$name"
  LAUNCHED+=("$name")
  for _ in $(seq 1 50); do  # exec chain (setsid, setpriv) settles within milliseconds
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] && return 0
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  log_tails
  die "$name did not start (pid $pid): see $DIR/log/$name.out and the logs above"
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_until() {  # wait_until SECONDS DESCRIPTION COMMAND...
  local limit="$1" what="$2"; shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    local d
    for d in "${LAUNCHED[@]}"; do
      alive_pid "$d" >/dev/null || { log_tails; die "$d exited while waiting for $what: see $DIR/log/"; }
    done
    [ "$SECONDS" -lt "$deadline" ] || { log_tails; die "timed out after ${limit}s waiting for $what: see $DIR/log/"; }
    sleep 0.5
  done
}

node_idle() { [ "$(timeout 10 sinfo -h -n "$NODE" -o %t 2>/dev/null)" = "idle" ]; }
srun_works() { [ "$(timeout 30 srun -n2 hostname 2>/dev/null | wc -l)" = 2 ]; }

cmd_start() {
  local root=0
  [ "$(id -u)" = 0 ] && root=1
  if [ "$root" = 1 ]; then
    mkdir -p "$DIR"
    exec 9>"$DIR/.lock"
    flock -w 180 9 || die "another local_cluster.sh holds $DIR/.lock for over 180s: wait or remove a stale lock"
  fi
  local t0=$SECONDS
  if all_alive && node_idle_or_busy; then
    say "reusing running cluster in $DIR (pids: $(for d in "${DAEMONS[@]}"; do printf '%s=%s ' "$d" "$(cat "$PIDS/$d")"; done))"
    echo "export SLURM_CONF=$CONF"
    echo "# local_cluster: reused"
    return 0
  fi
  [ "$root" = 1 ] || skip "no running cluster in $DIR and starting munged/slurmd needs root: run as root, or have root run '$0 start' first"
  stop_daemons  # remnants of a half-running cluster
  ensure_installed
  local p
  for p in "$PORT" "$((PORT + 1))"; do
    port_in_use "$p" && die "port $p is in use by another program (another Slurm?): set MAGCACHE_SLURM_PORT to a free port pair"
  done
  write_config
  # A start that fails part-way leaves nothing running behind it.
  # shellcheck disable=SC2154  # rc is assigned inside the trap
  trap 'rc=$?; if [ "$rc" != 0 ]; then stop_daemons; fi; exit "$rc"' EXIT
  rm -f "$SOCK" "$DIR/run/"*.pid
  : > "$DIR/log/slurmctld.log"; : > "$DIR/log/slurmd.log"  # munged (user munge) logs in $DIR/munge
  launch munged setpriv --reuid=munge --regid=munge --init-groups \
    munged --foreground --key-file="$DIR/munge/munge.key" --socket="$SOCK" \
    --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" \
    --seed-file="$DIR/munge/munged.seed"
  wait_until 15 "munged socket" test -S "$SOCK"
  # -c: start from a clean job state (a test cluster keeps nothing between starts).
  launch slurmctld slurmctld -D -c -i -f "$CONF"
  launch slurmd slurmd -D -f "$CONF" -N "$NODE"
  wait_until "$TIMEOUT" "node $NODE to become idle" node_idle
  wait_until 30 "'srun -n2 hostname' to work" srun_works
  say "cluster up in $((SECONDS - t0))s: node $NODE, state in $DIR"
  echo "export SLURM_CONF=$CONF"
  echo "# local_cluster: started"
}

# The controller answers and the node is usable (idle, or running jobs of a reused cluster).
node_idle_or_busy() {
  local st
  st="$(timeout 10 sinfo -h -n "$NODE" -o %t 2>/dev/null)" || return 1
  case "$st" in idle|mix|alloc|comp) return 0 ;; *) return 1 ;; esac
}

stop_daemons() {
  local d pid
  if alive_pid slurmctld >/dev/null && command -v scancel >/dev/null 2>&1; then
    # Jobs of this cluster only (SLURM_CONF points here): end them before their slurmd goes.
    timeout 10 scancel --user="$(id -un)" >/dev/null 2>&1 || true
    local deadline=$((SECONDS + 15))
    while [ -n "$(timeout 5 squeue -h -o %i 2>/dev/null)" ] && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.5; done
  fi
  for d in slurmd slurmctld munged; do
    pid="$(alive_pid "$d")" || { rm -f "$PIDS/$d"; continue; }
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + 20))
    while alive_pid "$d" >/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
    if alive_pid "$d" >/dev/null; then
      say "$d (pid $pid) ignored SIGTERM for 20s: sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.5
    fi
    say "stopped $d (pid $pid)"
    rm -f "$PIDS/$d"
  done
}

cmd_stop() {
  [ -d "$DIR" ] || { say "no cluster state in $DIR: nothing to stop"; return 0; }
  exec 9>"$DIR/.lock"
  flock -w 180 9 || die "another local_cluster.sh holds $DIR/.lock for over 180s: wait or remove a stale lock"
  stop_daemons
}

cmd_status() {
  local d pid up=0
  for d in "${DAEMONS[@]}"; do
    if pid="$(alive_pid "$d")"; then echo "$d: running (pid $pid)"; up=$((up + 1))
    else echo "$d: stopped"; fi
  done
  if [ "$up" = "${#DAEMONS[@]}" ]; then
    timeout 10 sinfo 2>/dev/null || echo "sinfo: controller not answering"
    echo "export SLURM_CONF=$CONF"
    return 0
  fi
  return 3
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) usage ;;
esac
