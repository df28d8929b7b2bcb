#!/usr/bin/env bash
# Embedded message queue vs redis-server, same client, same run, as ratios.
# PUBLISH throughput with no subscriber, and fan-out to 1, 100 and 1000 subscribers.
# Usage: bench/broker.sh [rounds]   (writes a table to stdout; `make bench-mq` appends
# it to docs/benchmarks.md)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
command -v redis-server >/dev/null || { apt-get update -q && apt-get install -y -q redis-server; }
cargo build --profile profiling -q --bin corral --example mqbench
corral=target/profiling/corral
bench=target/profiling/examples/mqbench
ulimit -n 65536 2>/dev/null || true

port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
rp=$(port); cp=$(port)
redis-server --port "$rp" --bind 127.0.0.1 --save "" --appendonly no --daemonize no >/dev/null &
rpid=$!
"$corral" mq --listen "127.0.0.1:$cp" 2>/dev/null &
cpid=$!
trap 'kill $rpid $cpid 2>/dev/null || true' EXIT
sleep 1

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
measure() { # port subscribers messages field
  for _ in $(seq "$rounds"); do
    "$bench" --port "$1" --subscribers "$2" --messages "$3" --size 256 |
      python3 -c "import json,sys; print(json.load(sys.stdin)['$4'])"
  done | median
}

echo "| scenario | redis-server | corral mq | corral / redis |"
echo "|---|---:|---:|---:|"
for spec in "0 200000 publish_per_s PUBLISH/s, no subscriber" \
            "1 200000 deliveries_per_s deliveries/s, 1 subscriber" \
            "100 5000 deliveries_per_s deliveries/s, 100 subscribers" \
            "1000 500 deliveries_per_s deliveries/s, 1000 subscribers"; do
  read -r subs msgs field label <<<"$spec"
  r=$(measure "$rp" "$subs" "$msgs" "$field")
  c=$(measure "$cp" "$subs" "$msgs" "$field")
  ratio=$(python3 -c "print(f'{$c/$r:.2f}')")
  printf '| %s | %.0f | %.0f | %s |\n' "$label" "$r" "$c" "$ratio"
done
