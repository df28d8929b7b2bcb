#!/usr/bin/env bash
# Idle proxied websockets at scale: corral, nginx and HAProxy in turn hold CONNS
# (default 100,000) idle websockets to the benchmark backend; reports each proxy's
# resident memory per connection and the time to open them all.
#   bench/idle.sh [CONNS]            (root: raises the descriptor limits)
#   PROXIES=corral CORRAL=path/to/corral bench/idle.sh   (one proxy, another build)
# Clients come from 8 source addresses (127.0.0.1-8) and the proxies spread over 4
# backend ports, so no address runs out of ports; the ephemeral port range is
# widened for the run and put back after.
set -euo pipefail
cd "$(dirname "$0")/.."
conns=${1:-100000}
[ "$(id -u)" = 0 ] || { echo "bench/idle.sh needs root (descriptor limits, port range)" >&2; exit 1; }
. bench/lib.sh
need nginx haproxy
cargo build --profile profiling -q --bin corral --example backend --example wsbench
# Each proxied connection takes two descriptors in the proxy. Where the hard limit
# cannot be raised (no CAP_SYS_RESOURCE, as in some containers), the run is capped
# at what one process may hold, and says so.
if ! ulimit -Hn 1048576 2>/dev/null; then
  cap=$(( ($(ulimit -Hn) - 200) / 2 ))
  if [ "$conns" -gt "$cap" ]; then
    echo "note: the descriptor hard limit is $(ulimit -Hn) and cannot be raised here; $conns capped to $cap" >&2
    conns=$cap
  fi
fi
ulimit -n "$(ulimit -Hn)"
old_range=$(sysctl -n net.ipv4.ip_local_port_range)
sysctl -q -w net.ipv4.ip_local_port_range="1024 65000"
work=$(mktemp -d); mkdir -p "$work/tmp"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  nginx -p "$work" -c "$work/nginx.conf" -s stop 2>/dev/null || true
  sysctl -q -w net.ipv4.ip_local_port_range="$old_range"
  rm -rf "$work"
}
trap cleanup EXIT
backends=()
for _ in 1 2 3 4; do
  b=$(port); backends+=("$b")
  target/profiling/examples/backend "127.0.0.1:$b" 2>/dev/null & pids+=($!)
done
sleep 0.5
per_conn=$((conns + 40))

start() { # name port
  case $1 in
    corral)
      { echo "listen = [\"127.0.0.1:$2\"]"
        printf 'upstreams = [%s]\n' "$(printf '"127.0.0.1:%s",' "${backends[@]}" | sed 's/,$//')"
        echo "admin_socket = \"$work/corral.sock\""
        echo "[limits]"; echo "max_connections = $per_conn"
        echo "[timeouts]"; echo 'websocket_idle = "3600s"'; echo 'header_read = "3600s"'
      } > "$work/corral.toml"
      "${CORRAL:-target/profiling/corral}" run -c "$work/corral.toml" 2>"$work/corral.log" & proxy_pid=$!;;
    nginx)
      cat > "$work/nginx.conf" <<EOC
worker_processes auto;
worker_rlimit_nofile $((2 * per_conn + 100));
pid $work/nginx.pid;
error_log $work/nginx-error.log warn;
events { worker_connections $((2 * per_conn)); multi_accept on; }
http {
    access_log off;
    client_body_temp_path $work/tmp;
    proxy_temp_path $work/tmp;
    upstream backend { $(for b in "${backends[@]}"; do echo "server 127.0.0.1:$b;"; done) }
    server {
        listen 127.0.0.1:$2 backlog=65535 reuseport;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "upgrade";
            proxy_set_header Upgrade \$http_upgrade;
            proxy_read_timeout 3600s;
        }
    }
}
EOC
      nginx -p "$work" -c "$work/nginx.conf" -g 'daemon off;' & proxy_pid=$!;;
    haproxy)
      cat > "$work/haproxy.cfg" <<EOC
global
    maxconn $per_conn
    nbthread 2
defaults
    mode http
    timeout connect 5s
    timeout client 3600s
    timeout server 3600s
    timeout tunnel 3600s
    maxconn $per_conn
frontend front
    bind 127.0.0.1:$2
    default_backend back
backend back
    balance roundrobin
$(i=0; for b in "${backends[@]}"; do i=$((i+1)); echo "    server s$i 127.0.0.1:$b maxconn $per_conn"; done)
EOC
      haproxy -f "$work/haproxy.cfg" -db 2>"$work/haproxy.log" & proxy_pid=$!;;
  esac
  pids+=($proxy_pid)
  for _ in $(seq 50); do curl -s -o /dev/null "http://127.0.0.1:$2/" && return; sleep 0.1; done
  echo "$1 did not start" >&2; exit 1
}

echo "| proxy | idle websockets held | time to open all (s) | proxy RSS (MiB) | bytes of RSS per connection |"
echo "|---|---:|---:|---:|---:|"
declare -A per
for proxy in ${PROXIES:-corral nginx haproxy}; do
  p=$(port); start $proxy "$p"
  sleep 1
  before=$(rss_kib "$proxy_pid")
  target/profiling/examples/wsbench idle "ws://127.0.0.1:$p/ws" "$conns" 10 8 > "$work/idle.out" &
  client=$!
  for _ in $(seq 1800); do grep -q connected "$work/idle.out" 2>/dev/null && break; sleep 0.2; done
  sleep 2
  after=$(rss_kib "$proxy_pid")
  read -r _ held open_s < <(grep connected "$work/idle.out")
  per[$proxy]=$(python3 -c "print(f'{max(0,($after-$before))*1024/max(1,$held):.0f}')")
  echo "| $proxy | $held | $open_s | $((after / 1024)) | ${per[$proxy]} |"
  wait $client || true
  if [ $proxy = nginx ]; then nginx -p "$work" -c "$work/nginx.conf" -s quit 2>/dev/null || true; fi
  kill "$proxy_pid" 2>/dev/null || true; wait "$proxy_pid" 2>/dev/null || true
  sleep 2
done
if [ -n "${per[nginx]:-}" ] && [ -n "${per[haproxy]:-}" ]; then
  python3 -c "c,n,h=${per[corral]},${per[nginx]},${per[haproxy]};print(f'\ncorral/nginx memory per connection: {c/n:.2f}; corral/HAProxy: {c/h:.2f}')"
fi
