#!/usr/bin/env bash
# User-space instructions and allocations per proxied request, under callgrind:
# corral (one serving thread) or nginx (one worker, no master) in front of the
# bench backend, keep-alive GETs with a browser-like header set: from wrk (HTTP/1.1,
# 8 connections, WRK_SECS seconds, the requests counted by wrk) by default, or with
# CLIENT=ab REQUESTS of them from ab (HTTP/1.0 keep-alive, which corral's fast
# client-side loop leaves to hyper). CLOSE=1: a new connection per request (wrk).
#   bench/callgrind.sh corral|nginx [REQUESTS]     (prints instructions/request)
# CORRAL_EXTRA adds TOML to corral's config (e.g. "[timeouts]\nkeepalive = \"30s\"").
# Startup is measured with one request and subtracted.
# CALLGRIND_OUT=file keeps the callgrind output (for callgrind_annotate).
# CARGO_TARGET_DIR builds (and runs) elsewhere, e.g. with other profile settings;
# CORRAL= runs another corral build.
set -euo pipefail
cd "$(dirname "$0")/.."
who=$1; n=${2:-20000}; client=${CLIENT:-wrk}
command -v valgrind >/dev/null && command -v ab >/dev/null && command -v wrk >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q valgrind apache2-utils wrk >/dev/null; }
tgt=${CARGO_TARGET_DIR:-target}
cargo build --profile profiling -q --bin corral --example backend
work=$(mktemp -d); mkdir -p "$work/tmp"
port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
backend=$(port)
$tgt/profiling/examples/backend "127.0.0.1:$backend" 2>/dev/null & bp=$!
trap 'kill $bp 2>/dev/null; rm -rf "$work"' EXIT
run() { # requests -> callgrind output file
  local p; p=$(port)
  case $who in
    corral)
      printf 'listen = ["127.0.0.1:%s"]\nupstreams = ["127.0.0.1:%s"]\nadmin_socket = "%s/c.sock"\nthreads = 1\n%b\n' "$p" "$backend" "$work" "${CORRAL_EXTRA:-}" > "$work/c.toml"
      valgrind --tool=callgrind --callgrind-out-file="$work/out.$1" "${CORRAL:-$tgt/profiling/corral}" run -c "$work/c.toml" >/dev/null 2>&1 & pid=$!;;
    nginx)
      sed -e "s#@PORT@#$p#g" -e "s#@BACKEND@#$backend#g" -e "s#@DIR@#$work#g" \
          -e 's/worker_processes auto;/worker_processes 1; master_process off; daemon off;/' bench/conf/nginx.conf.in > "$work/nginx.conf"
      valgrind --tool=callgrind --callgrind-out-file="$work/out.$1" nginx -p "$work" -c "$work/nginx.conf" >/dev/null 2>&1 & pid=$!;;
  esac
  for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$p/" && break; sleep 0.2; done
  if [ "$client" = wrk ] && [ "$1" != 1 ]; then
    wrk -t1 -c8 -d"${WRK_SECS:-20}s" -H "User-Agent: Mozilla/5.0 bench" -H "Accept-Encoding: gzip" \
      ${CLOSE:+-H "Connection: close"} "http://127.0.0.1:$p/" > "$work/wrk.out"
    awk '/requests in/ {print $1}' "$work/wrk.out" > "$work/count"
  else
    ab -q -k -n "$1" -c "$(( $1 < 8 ? $1 : 8 ))" -H "User-Agent: Mozilla/5.0 bench" -H "Accept-Encoding: gzip" "http://127.0.0.1:$p/" >/dev/null
    echo "$1" > "$work/count"
  fi
  case $who in corral) kill -TERM $pid;; nginx) kill -QUIT $pid;; esac
  wait $pid 2>/dev/null || true
}
run 1; run "$n"
one=$(awk '/^summary:/ {print $2}' "$work/out.1"); all=$(awk '/^summary:/ {print $2}' "$work/out.$n")
reqs=$(cat "$work/count")
echo "$who ($client, $reqs requests): $(( (all - one) / reqs )) instructions per request (user space)"
if [ "$who" = corral ]; then python3 bench/allocs.py "$work/out.$n" "$reqs"; fi
if [ -n "${CALLGRIND_OUT:-}" ]; then cp "$work/out.$n" "$CALLGRIND_OUT"; fi
