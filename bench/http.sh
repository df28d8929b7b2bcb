#!/usr/bin/env bash
# Small HTTP requests through corral, nginx and HAProxy, the same backend and the
# same wrk, in four ways: keep-alive clients and clients that open a new connection
# per request (`Connection: close`), over cleartext and over TLS 1.3 (one ECDSA
# P-256 certificate for all three). All three proxies run at once on their own
# ports and the rounds go round them in turn, so drift in the machine hits all
# alike. Reports req/s, p99 and the proxy's CPU (user + system, workers included)
# per request, medians of the rounds, and the ratios.
#   bench/http.sh [rounds] [seconds]          (make bench; CORRAL=path: another build;
#                                             BEFORE=path: a second corral in the same
#                                             rounds, its ratio to this one reported)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
secs=${2:-8}
. bench/lib.sh
need nginx haproxy wrk openssl
cargo build --profile profiling -q --bin corral --example backend
ulimit -n "$(ulimit -Hn)"
work=$(mktemp -d); mkdir -p "$work/tmp"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; nginx -p "$work" -c "$work/nginx.conf" -s stop 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj /CN=localhost -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null
cat "$work/cert.pem" "$work/key.pem" > "$work/both.pem"
backend=$(port)
target/profiling/examples/backend "127.0.0.1:$backend" 2>/dev/null & pids+=($!)
declare -A plain tls pid
proxies="corral nginx haproxy"
[ -z "${BEFORE:-}" ] || proxies="corral before nginx haproxy"
for p in $proxies; do plain[$p]=$(port); tls[$p]=$(port); done

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
EOC
"${CORRAL:-target/profiling/corral}" run -c "$work/corral.toml" 2>"$work/corral.log" & pid[corral]=$!
if [ -n "${BEFORE:-}" ]; then
  sed -e "s/:${plain[corral]}\"/:${plain[before]}\"/" -e "s/:${tls[corral]}\"/:${tls[before]}\"/" \
      -e "s#corral.sock#before.sock#" "$work/corral.toml" > "$work/before.toml"
  "$BEFORE" run -c "$work/before.toml" 2>"$work/before.log" & pid[before]=$!
fi
cat > "$work/nginx.conf" <<EOC
worker_processes auto;
worker_rlimit_nofile 20000;
pid $work/nginx.pid;
error_log $work/nginx-error.log warn;
events { worker_connections 9000; multi_accept on; }
http {
    access_log off;
    keepalive_requests 100000;
    client_body_temp_path $work/tmp;
    proxy_temp_path $work/tmp;
    ssl_protocols TLSv1.2 TLSv1.3;
    upstream backend { server 127.0.0.1:$backend; keepalive 256; }
    server {
        listen 127.0.0.1:${plain[nginx]} backlog=65535 reuseport;
        listen 127.0.0.1:${tls[nginx]} ssl http2 backlog=65535 reuseport;
        ssl_certificate $work/cert.pem;
        ssl_certificate_key $work/key.pem;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto \$scheme;
        }
    }
}
EOC
nginx -p "$work" -c "$work/nginx.conf" -g 'daemon off;' & pid[nginx]=$!
haproxy_cfg "$work/haproxy.cfg" "${plain[haproxy]}" "${tls[haproxy]}" "$work/both.pem" "$backend" h2,http/1.1
haproxy -f "$work/haproxy.cfg" -db 2>"$work/haproxy.log" & pid[haproxy]=$!
pids+=("${pid[@]}")
await_proxies $proxies

scenarios="plain-keepalive plain-close tls-keepalive tls-close"
url() { case $1 in plain-*) echo "http://127.0.0.1:${plain[$2]}/";; tls-*) echo "https://127.0.0.1:${tls[$2]}/";; esac; }
args() { case $1 in *-close) echo "-c32 -H Connection:close";; *) echo "-c64";; esac; }
for s in $scenarios; do for p in $proxies; do wrk -t2 $(args $s) -d2s "$(url $s $p)" >/dev/null 2>&1 || true; done; done
for r in $(seq "$rounds"); do
  for s in $scenarios; do
    for p in $proxies; do
      t0=$(cpu_ticks "${pid[$p]}")
      out=$(wrk -t2 $(args $s) -d"${secs}s" --latency "$(url $s $p)")
      t1=$(cpu_ticks "${pid[$p]}")
      n=$(echo "$out" | awk '/requests in/ {print $1}')
      echo "$out" | awk '/Requests\/sec/ {print $2}' >> "$work/$s.$p.rps"
      to_ms "$(echo "$out" | awk '$1=="99%" {print $2}')" >> "$work/$s.$p.p99"
      python3 -c "print(f'{($t1-$t0)*1e6/$(getconf CLK_TCK)/max(1,$n):.1f}')" >> "$work/$s.$p.cpu"
      errors=$(echo "$out" | awk '/Socket errors|Non-2xx/ {print}')
      [ -z "$errors" ] || echo "round $r $s $p: $errors" >&2
    done
  done
done
echo "| scenario | measure | corral | nginx | HAProxy | corral/nginx | corral/HAProxy |"
echo "|---|---|---:|---:|---:|---:|---:|"
for s in $scenarios; do
  for m in rps p99 cpu; do
    c=$(median < "$work/$s.corral.$m"); n=$(median < "$work/$s.nginx.$m"); h=$(median < "$work/$s.haproxy.$m")
    name=$(case $m in rps) echo "req/s";; p99) echo "p99 ms";; cpu) echo "proxy CPU µs/request";; esac)
    echo "| $s | $name | $c | $n | $h | $(ratio "$c" "$n") | $(ratio "$c" "$h") |"
  done
done
if [ -n "${BEFORE:-}" ]; then
  echo
  echo "| scenario | measure | corral | before | corral/before | before/nginx |"
  echo "|---|---|---:|---:|---:|---:|"
  for s in $scenarios; do
    for m in rps p99 cpu; do
      c=$(median < "$work/$s.corral.$m"); b=$(median < "$work/$s.before.$m"); n=$(median < "$work/$s.nginx.$m")
      echo "| $s | $m | $c | $b | $(ratio "$c" "$b") | $(ratio "$b" "$n") |"
    done
  done
fi
