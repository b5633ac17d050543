#!/bin/bash
# One TFTP server under N atftp clients, with a profiler on its worker (issue 20 profiles).
#
#   sudo unshare --net bench/tftpprof.sh SERVER BLKSIZE N FILE        # SERVER: sidusd|dnsmasq|tftpd-hpa|atftpd
#   STRACE=1 (strace -c; STRACE_OPTS="-tt -T" for a timeline) or PERF=1 (perf record -g) in the env
#
# Run inside a fresh network namespace (unshare --net). FILE is served as "big" from a temporary
# root. Prints MB/s (N x size / wall) and the worker's /proc/<pid>/schedstat before and after
# (ns on a CPU, ns waiting in the run queue, timeslices). Output files go to $OUT (/tmp).
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
srv=$1; bs=$2; n=$3; file=$4
OUT=${OUT:-/tmp}
root=$(mktemp -d); work=$(mktemp -d)
trap 'kill $SP 2>/dev/null; wait $SP 2>/dev/null; rm -rf "$root" "$work"' EXIT
cp "$file" "$root/big"; chmod 755 "$root"; chmod 644 "$root/big"
size=$(stat -c %s "$root/big")
ip link set lo up
ip link add ac0 type veth peer name ac1 && ip addr add 10.79.0.1/32 dev ac0   # tftpd-hpa: AI_ADDRCONFIG
cd "$REPO"
PY=${PY:-.venv/bin/python}
"$PY" - "$srv" "$root" "$work" <<'PY' > "$work/argv"
import sys, pathlib
from bench.peers import server_spec
s = server_spec(sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3]) / "w", 256)
print("\0".join(s.argv), end="")
PY
mapfile -d '' -t ARGV < "$work/argv"
"${ARGV[@]}" > "$work/server.log" 2>&1 &
SP=$!
for _ in $(seq 100); do atftp -g -r big -l /dev/null 127.0.0.1 69 2>/dev/null && break; sleep 0.3; done
W=$(pgrep -P $SP | head -1); [ -z "$W" ] && W=$SP          # sidusd: the worker under the supervisor
ST=""; PF=""
if [ -n "${STRACE:-}" ]; then strace ${STRACE_OPTS:--c} -f -p $W -o "$OUT/strace.$srv.$bs.txt" & ST=$!; sleep 1; fi
if [ -n "${PERF:-}" ]; then perf record -F 1999 -g -p $W -o "$OUT/perf.$srv.$bs.data" 2>/dev/null & PF=$!; sleep 1; fi
S0=$(cat /proc/$W/schedstat)
t0=$(date +%s.%N)
pids=""
for _ in $(seq "$n"); do atftp --option "blksize $bs" -g -r big -l /dev/null 127.0.0.1 69 2>/dev/null & pids="$pids $!"; done
wait $pids
t1=$(date +%s.%N)
echo "schedstat worker $W: $S0 -> $(cat /proc/$W/schedstat)"
echo "$srv blksize=$bs N=$n: $(echo "$n*$size/1000000/($t1-$t0)" | bc -l | cut -c1-7) MB/s"
[ -n "$ST" ] && kill -INT $ST && wait $ST
[ -n "$PF" ] && kill -INT $PF && wait $PF
