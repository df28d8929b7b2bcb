#!/usr/bin/env bash
# Runs the chat example: two gunicorn workers and corral in front on port 8000.
# Stop with Ctrl-C; every process started here is stopped with it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
venv=${VENV:-$root/.venv}
corral=${CORRAL_BIN:-$root/target/release/corral}
listen=${LISTEN:-127.0.0.1:8000}
pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM -- "-$p" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM
ups=()
for port in 5000 5001; do
  PORT=$port CORRAL_WORKER_ID="w$port" setsid "$venv/bin/gunicorn" -w 1 --threads 100 \
    -b "127.0.0.1:$port" --chdir "$here" 'app:create_app()' &
  pids+=($!)
  ups+=(--upstream "127.0.0.1:$port")
done
echo "corral: open http://$listen/ in two browsers"
"$corral" run --listen "$listen" "${ups[@]}" &
pids+=($!)
wait -n
