#!/usr/bin/env bash
# Where the kernel relay's tail latency comes from: with `kernel_relay`, a frame the
# verdict program redirects is queued on the target socket's psock and sent by the
# psock's work item (`sk_psock_backlog`) on the system workqueue, on a kworker bound
# to the CPU where the frame arrived: on loopback, the sending worker's own CPU.
# This runs the relay bench's load (the native `/feed` backend, N websockets, frames
# of 50-500 bytes at a total rate) through corral with the kernel relay, traces the
# work item's queueing and start (tracefs workqueue events) over a window, and prints
# the wait between the two (p50/p90/p99/max) and which threads held that CPU
# meanwhile. Needs root (BPF and tracefs).
#   bench/kernel_wait.sh [seconds] [websockets] [frames/s]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-8}
conns=${2:-200}
rate=${3:-10000}
. bench/lib.sh
cargo build --profile profiling -q --bin corral --example backend --example wsbench
ulimit -n "$(ulimit -Hn)"
T=/sys/kernel/tracing
[ -d "$T/events/workqueue" ] || mount -t tracefs none "$T"
work=$(mktemp -d)
pids=()
events="workqueue/workqueue_queue_work workqueue/workqueue_execute_start sched/sched_switch"
cleanup() {
  echo 0 > "$T/tracing_on" || true
  for e in $events; do echo 0 > "$T/events/$e/enable" || true; echo 0 > "$T/events/$e/filter" || true; done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
backend=$(port)
front=$(port)
target/profiling/examples/backend "127.0.0.1:$backend" >/dev/null 2>&1 & pids+=($!); backend_pid=$!
cat > "$work/corral.toml" <<EOC
upstreams = ["127.0.0.1:$backend"]
admin_socket = "$work/corral.sock"
[[listener]]
address = "127.0.0.1:$front"
[timeouts]
websocket_idle = "3600s"
[experimental]
kernel_relay = true
EOC
target/profiling/corral run -c "$work/corral.toml" >/dev/null 2>"$work/corral.log" & pids+=($!); corral_pid=$!
for _ in $(seq 50); do curl -s -o /dev/null "http://127.0.0.1:$front/" && break; sleep 0.1; done
addr=0x$(awk '$3 == "sk_psock_backlog" {print $1}' /proc/kallsyms)
echo 0 > "$T/tracing_on"
echo > "$T/trace"
echo 20000 > "$T/buffer_size_kb"
for e in workqueue/workqueue_queue_work workqueue/workqueue_execute_start; do
  echo "function == $addr" > "$T/events/$e/filter"
done
for e in $events; do echo 1 > "$T/events/$e/enable"; done
# The middle of the load: after the websockets are open, before they close.
window=$(( secs / 2 > 1 ? secs / 2 : 1 ))
( sleep $(( (secs - window) / 2 + 1 )); echo 1 > "$T/tracing_on"; sleep "$window"; echo 0 > "$T/tracing_on" ) & tracer=$!
target/profiling/examples/wsbench feed "ws://127.0.0.1:$front/feed" "$conns" "$secs" "$rate" & client_pid=$!
sleep 1
# Thread ids by process, to name who held the CPU.
for who in backend corral client; do
  pid_var=${who}_pid
  for t in $(ls "/proc/${!pid_var}/task"); do echo "$t $who"; done
done > "$work/threads"
wait "$client_pid" "$tracer"
cat "$T/trace" > "$work/trace"
python3 - "$work/trace" "$conns" "$rate" "$work/threads" <<'EOF'
import re, sys, collections
owner = dict(line.split() for line in open(sys.argv[4]))
queued, last_switch, waits, held = {}, {}, [], collections.Counter()
line_re = re.compile(r'^\s*(.+?)-(\d+)\s+\[(\d+)\].*?(\d+\.\d+): (\w+): (.*)')
for line in open(sys.argv[1]):
    m = line_re.match(line)
    if not m:
        continue
    _, _, cpu, t, event, rest = m.groups()
    t = float(t)
    if event == 'sched_switch':
        prev = re.search(r'prev_comm=(.*?) prev_pid=(\d+)', rest)
        if cpu in last_switch and prev:
            # The time since the last switch on this CPU went to `prev`; charge the
            # part that overlapped a queued work item's wait there.
            for q, (since, on) in queued.items():
                if on == cpu:
                    name = owner.get(prev.group(2), prev.group(1))
                    held[name] += t - max(since, last_switch[cpu])
        last_switch[cpu] = t
    elif event == 'workqueue_queue_work':
        work = re.search(r'struct=(\w+)', rest).group(1)
        on = re.search(r' cpu=(\d+)', rest).group(1).zfill(3)
        queued.setdefault(work, (t, on))
    elif event == 'workqueue_execute_start':
        work = re.search(r'struct (\w+):', rest).group(1)
        if work in queued:
            waits.append((t - queued.pop(work)[0]) * 1e6)
if not waits:
    sys.exit("no psock work traced: is the kernel relay on (see corral's log)?")
waits.sort()
n = len(waits)
pick = lambda q: round(waits[min(n - 1, int(n * q))])
print(f"{sys.argv[2]} websockets, {sys.argv[3]} frames/s: {n} psock work items traced")
print(f"wait from queued to running (µs): p50 {pick(0.5)}, p90 {pick(0.9)}, p99 {pick(0.99)}, max {round(waits[-1])}")
total = sum(held.values()) or 1
print("the CPU meanwhile held by:", ", ".join(f"{k} {100 * v / total:.0f} %" for k, v in held.most_common(4)))
EOF
