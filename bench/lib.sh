# Helpers shared by the proxy benchmarks (sourced by proxies.sh, http.sh, idle.sh,
# relay.sh, relay_callgrind.sh).

# Installs whichever of the named commands are missing (apt package = command).
need() {
  local missing=()
  for p in "$@"; do command -v "$p" >/dev/null || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] || { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; }
}
# A free loopback port.
port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
# The median of the numbers on stdin, one per line.
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
# wrk's latency ("812.00us", "3.14ms", "1.2s") in milliseconds.
to_ms() { python3 -c "import sys;v=sys.argv[1];u=v.lstrip('0123456789.');n=float(v[:len(v)-len(u)]);print(round(n*{'us':0.001,'ms':1,'s':1000}[u],3))" "$1"; }
# CPU time (user + system, clock ticks) of a process and its children (nginx workers).
cpu_ticks() { local t=0; for q in $(pgrep -P "$1") "$1"; do t=$((t + $(awk '{print $14 + $15}' /proc/$q/stat 2>/dev/null || echo 0))); done; echo $t; }
# Resident memory of a process and its children, in KiB.
rss_kib() { local t=0; for q in $(pgrep -P "$1") "$1"; do t=$((t + $(awk '/VmRSS/ {print $2}' /proc/$q/status 2>/dev/null || echo 0))); done; echo $t; }
# a/b to two places ("-" when b is 0).
ratio() { python3 -c "a,b=float('$1'),float('$2');print(f'{a/b:.2f}' if b else '-')"; }
# HAProxy in front of one backend, cleartext on PLAIN and TLS on TLSPORT with PEM
# (certificate and key in one file), its ALPN list, any EXTRA lines for `defaults`.
#   haproxy_cfg FILE PLAIN TLSPORT PEM BACKEND ALPN [EXTRA]
haproxy_cfg() {
  cat > "$1" <<EOC
global
    maxconn 9000
    nbthread 2
    ssl-default-bind-options ssl-min-ver TLSv1.2
defaults
    mode http
    option http-keep-alive
    option forwardfor
    http-reuse always
    timeout connect 5s
    timeout client 60s
    timeout server 60s
${7:-}
frontend front
    bind 127.0.0.1:$2
    bind 127.0.0.1:$3 ssl crt $4 alpn $6
    http-request set-header X-Forwarded-Proto https if { ssl_fc }
    default_backend back
backend back
    server s1 127.0.0.1:$5 maxconn 9000
EOC
}
# Waits until each proxy named answers on its cleartext port (the array `plain`)
# and fails unless it answers https on its TLS port (the array `tls`).
await_proxies() {
  local p
  for p in "$@"; do
    for _ in $(seq 50); do curl -s -o /dev/null "http://127.0.0.1:${plain[$p]}/" && break; sleep 0.1; done
    curl -sk -o /dev/null --fail "https://127.0.0.1:${tls[$p]}/" || { echo "$p does not answer https" >&2; exit 1; }
  done
}
