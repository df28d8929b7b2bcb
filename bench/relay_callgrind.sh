#!/usr/bin/env bash
# User-space instructions per relayed websocket frame, under callgrind: corral (one
# serving thread) in front of the bench backend's `/feed`, `wsbench feed` with CONNS
# websockets at RATE frames/s in all, once for a SHORT and once for a LONG window.
# The difference of the two runs' instructions over the difference of their frames
# leaves out start-up and the opening of the websockets. Instruction counts do not
# depend on the machine's load: a before/after pair needs no interleaving.
#   bench/relay_callgrind.sh [conns] [rate] [short] [long]   (prints instructions/frame)
# CORRAL= another build; CALLGRIND_OUT=file keeps the long run's output.
set -euo pipefail
cd "$(dirname "$0")/.."
conns=${1:-50}; rate=${2:-2000}; short=${3:-2}; long=${4:-8}
. bench/lib.sh
need valgrind
cargo build --profile profiling -q --bin corral --example backend --example wsbench
corral=${CORRAL:-target/profiling/corral}
ulimit -n "$(ulimit -Hn)"
work=$(mktemp -d)
backend=$(port)
target/profiling/examples/backend "127.0.0.1:$backend" >/dev/null 2>&1 & bp=$!
trap 'kill $bp 2>/dev/null; rm -rf "$work"' EXIT
run() { # seconds -> instructions and frames in $work/{out,frames}.SECONDS
  local p pid; p=$(port)
  printf 'listen = ["127.0.0.1:%s"]\nupstreams = ["127.0.0.1:%s"]\nadmin_socket = "%s/c.sock"\nthreads = 1\n[timeouts]\nwebsocket_idle = "3600s"\n' \
    "$p" "$backend" "$work" > "$work/c.toml"
  valgrind --tool=callgrind --callgrind-out-file="$work/out.$1" "$corral" run -c "$work/c.toml" >/dev/null 2>&1 & pid=$!
  for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$p/" && break; sleep 0.2; done
  target/profiling/examples/wsbench feed "ws://127.0.0.1:$p/feed" "$conns" "$1" "$rate" > "$work/feed.$1"
  python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])["frames"])' "$work/feed.$1" > "$work/frames.$1"
  kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
}
run "$short"; run "$long"
a=$(awk '/^summary:/ {print $2}' "$work/out.$short"); b=$(awk '/^summary:/ {print $2}' "$work/out.$long")
fa=$(cat "$work/frames.$short"); fb=$(cat "$work/frames.$long")
echo "corral ($conns websockets, $rate frames/s, ${short}s and ${long}s): $(( (b - a) / (fb - fa) )) instructions per frame (user space; $((fb - fa)) frames)"
if [ -n "${CALLGRIND_OUT:-}" ]; then cp "$work/out.$long" "$CALLGRIND_OUT"; fi
