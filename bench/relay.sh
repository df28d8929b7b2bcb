#!/usr/bin/env bash
# The websocket relay alone: N websockets through corral, nginx and HAProxy to the
# same native backend (`/feed`), which sends each one binary frames of 50 to 500
# bytes at a fixed total rate, as a Socket.IO worker's broadcasts go out; over
# cleartext and over TLS 1.3 (one ECDSA P-256 certificate for all three). All three
# proxies run at once on their own ports and each round goes round them in turn
# (and the backend direct, for the latency the proxies add). Reports the proxy's CPU
# (user + system, from /proc, nginx's workers included) per delivered frame, and the
# time of the kernel's worker threads over the same window (kworker, ksoftirqd), the
# frames' p50/p99 latency and what each proxy adds to the direct one, and the
# proxy's resident memory with the websockets open: medians of the rounds, ratios.
#   bench/relay.sh [rounds] [seconds] [websockets] [frames/s]   (make bench-relay)
#   BEFORE=path/to/corral bench/relay.sh ...  also that build of corral, same config,
#                                            in the same rounds (a before/after pair)
#   TOGETHER=1 bench/relay.sh ...   the proxies side by side: in each round all of
#     them at once (and the backend direct, as many feeds at once), each with its
#     share of the websockets and the rate, so that all see the same machine (one
#     after the other, the machine's own swings are as large as the differences);
#     the kernel workers' column is then everyone's
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
secs=${2:-8}
conns=${3:-200}
rate=${4:-10000}
. bench/lib.sh
need nginx haproxy openssl
cargo build --profile profiling -q --bin corral --example backend --example wsbench
ulimit -n "$(ulimit -Hn)"
work=$(mktemp -d); mkdir -p "$work/tmp"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; nginx -p "$work" -c "$work/nginx.conf" -s stop 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj /CN=localhost -addext subjectAltName=IP:127.0.0.1 -addext basicConstraints=critical,CA:FALSE \
  -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null
cat "$work/cert.pem" "$work/key.pem" > "$work/both.pem"
backend=$(port)
target/profiling/examples/backend "127.0.0.1:$backend" >/dev/null 2>&1 & pids+=($!)
declare -A plain tls pid v
ps=(corral nginx haproxy); [ -n "${BEFORE:-}" ] && ps+=(before)
for p in "${ps[@]}"; do plain[$p]=$(port); tls[$p]=$(port); done

cat > "$work/corral.toml" <<EOC
upstreams = ["127.0.0.1:$backend"]
admin_socket = "$work/corral.sock"
[[listener]]
address = "127.0.0.1:${plain[corral]}"
[[listener]]
address = "127.0.0.1:${tls[corral]}"
tls = { cert = "$work/cert.pem", key = "$work/key.pem" }
[limits]
max_connections = 9000
[timeouts]
websocket_idle = "3600s"
EOC
"${CORRAL:-target/profiling/corral}" run -c "$work/corral.toml" >/dev/null 2>"$work/corral.log" & pid[corral]=$!
if [ -n "${BEFORE:-}" ]; then
  sed -e "s/:${plain[corral]}\"/:${plain[before]}\"/" -e "s/:${tls[corral]}\"/:${tls[before]}\"/" \
    -e "s#corral.sock#before.sock#" "$work/corral.toml" > "$work/before.toml"
  "$BEFORE" run -c "$work/before.toml" >/dev/null 2>"$work/before.log" & pid[before]=$!
fi
cat > "$work/nginx.conf" <<EOC
worker_processes auto;
worker_rlimit_nofile 20000;
pid $work/nginx.pid;
error_log $work/nginx-error.log warn;
events { worker_connections 9000; multi_accept on; }
http {
    access_log off;
    client_body_temp_path $work/tmp;
    proxy_temp_path $work/tmp;
    ssl_protocols TLSv1.2 TLSv1.3;
    upstream backend { server 127.0.0.1:$backend; keepalive 256; }
    server {
        listen 127.0.0.1:${plain[nginx]} backlog=65535 reuseport;
        listen 127.0.0.1:${tls[nginx]} ssl backlog=65535 reuseport;
        ssl_certificate $work/cert.pem;
        ssl_certificate_key $work/key.pem;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Upgrade \$http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_set_header Host \$host;
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto \$scheme;
            proxy_read_timeout 3600s;
        }
    }
}
EOC
nginx -p "$work" -c "$work/nginx.conf" -g 'daemon off;' >/dev/null 2>&1 & pid[nginx]=$!
haproxy_cfg "$work/haproxy.cfg" "${plain[haproxy]}" "${tls[haproxy]}" "$work/both.pem" "$backend" http/1.1 "    timeout tunnel 3600s"
haproxy -f "$work/haproxy.cfg" -db >/dev/null 2>"$work/haproxy.log" & pid[haproxy]=$!
pids+=("${pid[@]}")
await_proxies "${ps[@]}"

url() { case $1 in plain) echo "ws://127.0.0.1:${plain[$2]}/feed";; tls) echo "wss://127.0.0.1:${tls[$2]}/feed";; esac; }
feed() { # url [pid] -> one JSON line
  PROXY_PID=${2:-} WSBENCH_CA="$work/cert.pem" target/profiling/examples/wsbench feed "$1" "$conns" "$secs" "$rate"
}
# Waits for the feeds started in the background (not for the proxies).
wait_feeds() { local j; for j in $(jobs -p); do case " ${pids[*]} " in *" $j "*) ;; *) wait "$j";; esac; done; }
field() { python3 -c "import json,sys;print(json.loads(sys.argv[1]).get('$2',0))" "$1"; }
record() { # relay proxy json
  local s=$1 p=$2 out=$3 m
  for m in cpu_us_per_frame kernel_us_per_frame p50_us p99_us rss_kib frames_per_s; do field "$out" $m >> "$work/$s.$p.$m"; done
  python3 -c "import json,sys;j=json.loads(sys.argv[1]);print(round(j['cpu_us_per_frame']+j['kernel_us_per_frame'],3))" "$out" >> "$work/$s.$p.total_us_per_frame"
  [ "$(field "$out" errors)$(field "$out" failed)" = 00 ] || echo "round $r $s $p: $out" >&2
}
if [ -n "${TOGETHER:-}" ]; then
  # Each feed gets its share of the websockets and the rate.
  all=$conns; all_rate=$rate
  conns=$(( all / ${#ps[@]} )); rate=$(( all_rate / ${#ps[@]} ))
fi
for r in $(seq "$rounds"); do
  if [ -n "${TOGETHER:-}" ]; then
    for i in "${!ps[@]}"; do feed "ws://127.0.0.1:$backend/feed" > "$work/direct.out.$i" & done; wait_feeds
    out=$(cat "$work/direct.out.0")
  else
    out=$(feed "ws://127.0.0.1:$backend/feed")
  fi
  for m in p50_us p99_us; do field "$out" $m >> "$work/direct.$m"; done
  for s in plain tls; do
    if [ -n "${TOGETHER:-}" ]; then
      for p in "${ps[@]}"; do feed "$(url $s $p)" "${pid[$p]}" > "$work/out.$p" & done; wait_feeds
      for p in "${ps[@]}"; do record $s $p "$(cat "$work/out.$p")"; done
    else
      for p in "${ps[@]}"; do record $s $p "$(feed "$(url $s $p)" "${pid[$p]}")"; done
    fi
  done
done
if [ -n "${TOGETHER:-}" ]; then conns=$all; rate=$all_rate; fi
d50=$(median < "$work/direct.p50_us"); d99=$(median < "$work/direct.p99_us")
echo "$conns websockets, $rate frames/s in all, 50-500 bytes; ${secs}s per round, $rounds rounds; direct p50 ${d50} µs, p99 ${d99} µs"
echo
if [ -n "${BEFORE:-}" ]; then
  echo "| relay | measure | corral | nginx | HAProxy | corral/nginx | corral/HAProxy | before | corral/before |"
  echo "|---|---|---:|---:|---:|---:|---:|---:|---:|"
else
  echo "| relay | measure | corral | nginx | HAProxy | corral/nginx | corral/HAProxy |"
  echo "|---|---|---:|---:|---:|---:|---:|"
fi
for s in plain tls; do
  for m in frames_per_s cpu_us_per_frame kernel_us_per_frame total_us_per_frame add50 add99 rss_kib; do
    case $m in
      add50) for p in "${ps[@]}"; do v[$p]=$(python3 -c "print(round($(median < "$work/$s.$p.p50_us") - $d50))"); done;;
      add99) for p in "${ps[@]}"; do v[$p]=$(python3 -c "print(round($(median < "$work/$s.$p.p99_us") - $d99))"); done;;
      *) for p in "${ps[@]}"; do v[$p]=$(median < "$work/$s.$p.$m"); done;;
    esac
    name=$(case $m in frames_per_s) echo "frames/s delivered";; cpu_us_per_frame) echo "proxy process CPU µs/frame";; kernel_us_per_frame) echo "kernel workers µs/frame";; total_us_per_frame) echo "**proxy + kernel workers µs/frame**";; add50) echo "added p50 µs";; add99) echo "added p99 µs";; rss_kib) echo "RSS KiB";; esac)
    row="| $s | $name | ${v[corral]} | ${v[nginx]} | ${v[haproxy]} | $(ratio "${v[corral]}" "${v[nginx]}") | $(ratio "${v[corral]}" "${v[haproxy]}") |"
    [ -n "${BEFORE:-}" ] && row="$row ${v[before]} | $(ratio "${v[corral]}" "${v[before]}") |"
    echo "$row"
  done
done
