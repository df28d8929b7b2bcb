# Helpers shared by the proxy benchmarks (sourced by proxies.sh, http.sh, idle.sh).

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
