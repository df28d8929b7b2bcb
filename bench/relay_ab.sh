#!/usr/bin/env bash
# Two builds of corral relaying the same load at the same time: each in front of the
# same native backend (`/feed`), each fed by its own `wsbench feed` with half the
# websockets and half the rate, both started together. Each run prints both builds'
# CPU per delivered frame (on-CPU time of all their threads from schedstat, in
# nanoseconds, over the middle of the run) and their ratio; the last line is the
# median ratio. Run one after the other, single runs of this machine vary by ±10 %
# and a difference of a few per cent drowns; side by side, both builds see the same
# machine, and the ratio holds to a per cent or two.
#   bench/relay_ab.sh NEW OLD [runs] [websockets] [frames/s]   (NEW, OLD: corral binaries)
set -euo pipefail
cd "$(dirname "$0")/.."
new=$1; old=$2; runs=${3:-6}; conns=${4:-200}; rate=${5:-10000}
. bench/lib.sh
cargo build --profile profiling -q --example backend --example wsbench
ulimit -n "$(ulimit -Hn)"
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
backend=$(port)
target/profiling/examples/backend "127.0.0.1:$backend" >/dev/null 2>&1 & pids+=($!)
# On-CPU nanoseconds of all of a process's threads.
ns() { local t=0 f; for f in /proc/$1/task/*/schedstat; do t=$((t + $(awk '{print $1}' "$f" 2>/dev/null || echo 0))); done; echo $t; }
secs=8; window=4
for r in $(seq "$runs"); do
  declare -A port=() pid=()
  for b in new old; do
    port[$b]=$(port)
    printf 'listen = ["127.0.0.1:%s"]\nupstreams = ["127.0.0.1:%s"]\nadmin_socket = "%s/%s.sock"\n[limits]\nmax_connections = 9000\n[timeouts]\nwebsocket_idle = "3600s"\n' \
      "${port[$b]}" "$backend" "$work" "$b" > "$work/$b.toml"
  done
  "$new" run -c "$work/new.toml" >/dev/null 2>&1 & pid[new]=$!
  "$old" run -c "$work/old.toml" >/dev/null 2>&1 & pid[old]=$!
  pids+=("${pid[new]}" "${pid[old]}")
  for b in new old; do for _ in $(seq 50); do curl -s -o /dev/null "http://127.0.0.1:${port[$b]}/" && break; sleep 0.1; done; done
  feeds=()
  for b in new old; do
    target/profiling/examples/wsbench feed "ws://127.0.0.1:${port[$b]}/feed" $((conns / 2)) "$secs" $((rate / 2)) > "$work/$b.feed" & feeds+=($!)
  done
  # The middle of the run: the websockets open, frames flowing.
  sleep $(( (secs - window) / 2 + 1 ))
  a_new=$(ns "${pid[new]}"); a_old=$(ns "${pid[old]}")
  sleep "$window"
  b_new=$(ns "${pid[new]}"); b_old=$(ns "${pid[old]}")
  wait "${feeds[@]}"
  kill "${pid[new]}" "${pid[old]}"; wait "${pid[new]}" "${pid[old]}" 2>/dev/null || true
  frames=$(( rate / 2 * window ))
  python3 -c "n=($b_new-$a_new)/1000/$frames; o=($b_old-$a_old)/1000/$frames; print(f'run $r: new {n:.3f} µs/frame, old {o:.3f}, new/old {n/o:.3f}')" | tee -a "$work/runs"
done
echo "median new/old: $(awk '{print $NF}' "$work/runs" | median)"
