#!/usr/bin/env bash
# corral against nginx and HAProxy: the same native backend, the same load
# generators, each proxy in turn, several rounds, medians and ratios.
#   bench/proxies.sh [rounds]      (make bench; prints a markdown section)
# Scenarios: 1. small HTTP GET with keep-alive (wrk); 2. websocket echo with 10, 100
# and 1000 connections (bench/wsbench.rs); the proxy's CPU time (user + system, its
# worker processes included) per request and per message in both; 3. resident
# memory per idle websocket
# (IDLE_CONNS, default 9000: each proxy needs two descriptors per connection and this
# machine allows 20,000 per process).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
idle=${IDLE_CONNS:-9000}
. bench/lib.sh
need nginx haproxy wrk
cargo build --profile profiling -q --bin corral --example backend --example wsbench
ulimit -n "$(ulimit -Hn)"
work=$(mktemp -d); mkdir -p "$work/tmp"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; nginx -p "$work" -c "$work/nginx.conf" -s stop 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
backend=$(port)
target/profiling/examples/backend "127.0.0.1:$backend" 2>/dev/null & pids+=($!)
sleep 0.5
fill() { sed -e "s#@PORT@#$2#g" -e "s#@BACKEND@#$backend#g" -e "s#@DIR@#$work#g" "bench/conf/$1.in" > "$work/$1"; }

start_proxy() { # name port -> sets proxy_pid (the process whose memory is measured)
  case $1 in
    corral) fill corral.toml "$2"; target/profiling/corral run -c "$work/corral.toml" 2>"$work/corral.log" & proxy_pid=$!;;
    nginx) fill nginx.conf "$2"; nginx -p "$work" -c "$work/nginx.conf" -g 'daemon off;' & proxy_pid=$!;;
    haproxy) fill haproxy.cfg "$2"; haproxy -f "$work/haproxy.cfg" -db 2>"$work/haproxy.log" & proxy_pid=$!;;
  esac
  pids+=($proxy_pid)
  for _ in $(seq 50); do curl -s -o /dev/null "http://127.0.0.1:$2/" && return; sleep 0.1; done
  echo "$1 did not start" >&2; exit 1
}
stop_proxy() {
  if [ "$1" = nginx ]; then nginx -p "$work" -c "$work/nginx.conf" -s quit 2>/dev/null || true; fi
  kill "$proxy_pid" 2>/dev/null || true; wait "$proxy_pid" 2>/dev/null || true; sleep 0.5
}
per_op_us() { python3 -c "import sys;print(f'{($2-$1)*1e6/$(getconf CLK_TCK)/max(1,$3):.1f}')"; }

declare -A R
for proxy in corral nginx haproxy; do
  p=$(port); start_proxy $proxy "$p"
  wrk -t2 -c64 -d3s "http://127.0.0.1:$p/" >/dev/null 2>&1 || true   # warm-up
  for r in $(seq "$rounds"); do
    t0=$(cpu_ticks "$proxy_pid")
    out=$(wrk -t2 -c64 -d10s --latency "http://127.0.0.1:$p/")
    per_op_us "$t0" "$(cpu_ticks "$proxy_pid")" "$(echo "$out" | awk '/requests in/ {print $1}')" >> "$work/$proxy.cpu"
    echo "$out" | awk '/Requests\/sec/ {print $2}' >> "$work/$proxy.rps"
    echo "$out" | awk '$1=="50%" {print $2}' >> "$work/$proxy.p50"
    echo "$out" | awk '$1=="99%" {print $2}' >> "$work/$proxy.p99"
  done
  R[$proxy,rps]=$(median < "$work/$proxy.rps")
  R[$proxy,cpu]=$(median < "$work/$proxy.cpu")
  R[$proxy,p50]=$(for v in $(cat "$work/$proxy.p50"); do to_ms "$v"; done | median)
  R[$proxy,p99]=$(for v in $(cat "$work/$proxy.p99"); do to_ms "$v"; done | median)
  for n in 10 100 1000; do
    for r in $(seq "$rounds"); do
      t0=$(cpu_ticks "$proxy_pid")
      target/profiling/examples/wsbench echo "ws://127.0.0.1:$p/ws" $n 8 > "$work/ws.json"
      t1=$(cpu_ticks "$proxy_pid")
      python3 -c "import json;d=json.load(open('$work/ws.json'));print(d['messages_per_s'],d['p50_us'],d['p99_us'],f\"{($t1-$t0)*1e6/$(getconf CLK_TCK)/max(1,d['messages_per_s']*8):.1f}\")" >> "$work/$proxy.ws$n"
    done
    R[$proxy,ws$n]=$(awk '{print $1}' "$work/$proxy.ws$n" | median)
    R[$proxy,ws$n.p99]=$(awk '{print $3}' "$work/$proxy.ws$n" | median)
    R[$proxy,ws$n.cpu]=$(awk '{print $4}' "$work/$proxy.ws$n" | median)
  done
  before=$(rss_kib "$proxy_pid")
  target/profiling/examples/wsbench idle "ws://127.0.0.1:$p/ws" "$idle" 15 4 > "$work/idle.out" &
  idle_pid=$!
  for _ in $(seq 600); do grep -q connected "$work/idle.out" 2>/dev/null && break; sleep 0.2; done
  sleep 2
  after=$(rss_kib "$proxy_pid")
  held=$(awk '/^connected/ {print $2}' "$work/idle.out")
  R[$proxy,idle]=$(python3 -c "print(f'{max(0,($after-$before))*1024/max(1,$held):.0f}')")
  R[$proxy,held]=$held
  wait $idle_pid || true
  stop_proxy $proxy
done

echo "| scenario | corral | nginx | HAProxy | corral/nginx | corral/HAProxy |"
echo "|---|---:|---:|---:|---:|---:|"
row() { echo "| $1 | ${R[corral,$2]} | ${R[nginx,$2]} | ${R[haproxy,$2]} | $(ratio ${R[corral,$2]} ${R[nginx,$2]}) | $(ratio ${R[corral,$2]} ${R[haproxy,$2]}) |"; }
row "HTTP GET req/s (wrk -t2 -c64)" rps
row "HTTP GET p50 ms" p50
row "HTTP GET p99 ms" p99
row "proxy CPU µs per HTTP request" cpu
for n in 10 100 1000; do
  row "websocket echo msgs/s, $n conns" ws$n
  row "websocket echo RTT p99 µs, $n conns" ws$n.p99
  row "proxy CPU µs per websocket message, $n conns" ws$n.cpu
done
row "bytes of RSS per idle websocket ($idle opened)" idle
row "idle websockets held" held
