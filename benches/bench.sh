#!/usr/bin/env bash
# Pass-through benchmark, side by side in one run on loopback:
#   direct     wrk -> upstream
#   sidecache  wrk -> sidecache (release) -> upstream
#   nginx      wrk -> nginx (keep-alive reverse proxy) -> upstream
# The upstream is an nginx server block answering a fixed 1 KiB body, so every row hits the same
# backend. Prints requests/s, p50 and p99 per row, the ratios sidecache/nginx, and sidecache's RSS
# idle and under load.
#
# The targets are measured in interleaved rounds (direct, sidecache, nginx, direct, ...) and each
# figure is the median over the rounds, so a noisy neighbour cannot favour one target.
#
# Usage: benches/bench.sh [seconds per measurement, default 5] [connections, default 64] [rounds, default 3]
# Needs: wrk and nginx (apt-get install wrk nginx-light), cargo. Everything stays on 127.0.0.1 and
# every process started here is stopped by pid on exit.
set -euo pipefail

DURATION=${1:-5}
CONNECTIONS=${2:-64}
ROUNDS=${3:-3}
THREADS=2
cd "$(dirname "$0")/.."

for tool in wrk nginx; do
  command -v "$tool" >/dev/null || { echo "bench: $tool is missing (apt-get install wrk nginx-light)" >&2; exit 1; }
done
cargo build --release --quiet
BIN=target/release/sidecache

WORK=$(mktemp -d /tmp/sidecache-bench.XXXXXX)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
UP=$(free_port); NGX=$(free_port); SC=$(free_port); SCA=$(free_port)

BODY=$(head -c 1024 /dev/zero | tr '\0' 'x')
cat >"$WORK/nginx.conf" <<EOF
worker_processes 2;
daemon off;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  upstream backend { server 127.0.0.1:$UP; keepalive 128; }
  server {
    listen 127.0.0.1:$UP;
    location / { default_type text/plain; return 200 '$BODY'; }
  }
  server {
    listen 127.0.0.1:$NGX;
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_buffering on;
    }
  }
}
EOF
nginx -p "$WORK" -c "$WORK/nginx.conf" &
PIDS+=($!)

cat >"$WORK/proxy.toml" <<EOF
[server]
listen = "127.0.0.1:$SC"
[admin]
listen = "127.0.0.1:$SCA"
[upstream]
url = "http://127.0.0.1:$UP"
[log]
level = "warn"
EOF
"$BIN" --config "$WORK/proxy.toml" >"$WORK/sidecache.log" 2>&1 &
SC_PID=$!
PIDS+=($SC_PID)

for port in $UP $NGX $SC; do
  for _ in $(seq 1 100); do curl -fsS -o /dev/null "http://127.0.0.1:$port/" 2>/dev/null && break; sleep 0.05; done
done

rss() { awk -v f="$2" '$1==f {print $2}' "/proc/$1/status"; }
IDLE_RSS=$(rss $SC_PID VmRSS:)

# run NAME PORT -> prints "NAME rps p50_ms p99_ms"
run() {
  wrk -t"$THREADS" -c"$CONNECTIONS" -d1s "http://127.0.0.1:$2/" >/dev/null 2>&1 # warm-up
  local out
  out=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency "http://127.0.0.1:$2/")
  echo "$out" >"$WORK/wrk-$1.txt"
  local rps p50 p99 errors
  rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  errors=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out" | tr '\n' ' ')
  printf '%s %s %s %s %s\n' "$1" "$rps" "$(to_ms "$p50")" "$(to_ms "$p99")" "${errors:-}"
}
to_ms() { # wrk prints 512.00us / 1.23ms / 1.01s
  awk -v v="$1" 'BEGIN { n=v+0; if (v ~ /us$/) n/=1000; else if (v ~ /ms$/) n=n; else if (v ~ /s$/) n*=1000; printf "%.3f", n }'
}

echo "sidecache pass-through benchmark: wrk -t$THREADS -c$CONNECTIONS, ${DURATION}s x $ROUNDS interleaved rounds, 1 KiB responses, $(nproc) cores"
: >"$WORK/results"
for round in $(seq 1 "$ROUNDS"); do
  run direct "$UP" >>"$WORK/results"
  run sidecache "$SC" >>"$WORK/results"
  run nginx "$NGX" >>"$WORK/results"
done
LOAD_RSS=$(rss $SC_PID VmHWM:)

# median NAME COLUMN
median() { awk -v n="$1" -v c="$2" '$1==n {print $c}' "$WORK/results" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
printf '\n%-10s %12s %10s %10s   (medians of %s rounds)\n' target "req/s" "p50 ms" "p99 ms" "$ROUNDS"
for name in direct sidecache nginx; do
  printf '%-10s %12.0f %10s %10s\n' "$name" "$(median $name 2)" "$(median $name 3)" "$(median $name 4)"
done
errors=$(awk 'NF > 4' "$WORK/results")
[ -z "$errors" ] || printf 'errors reported by wrk:\n%s\n' "$errors"
awk -v a="$(median sidecache 2)" -v b="$(median nginx 2)" -v c="$(median direct 2)" \
    -v m="$(median sidecache 3)" -v n="$(median nginx 3)" -v p="$(median sidecache 4)" -v q="$(median nginx 4)" 'BEGIN {
  printf "\nsidecache/nginx  throughput %.2f   p50 %.2f   p99 %.2f   (throughput above 1 and latency below 1 favour sidecache)\n", a/b, m/n, p/q
  printf "sidecache/direct throughput %.2f\n", a/c }'
printf 'sidecache RSS: idle %.1f MiB, peak under load %.1f MiB\n' "$(echo "$IDLE_RSS/1024" | bc -l)" "$(echo "$LOAD_RSS/1024" | bc -l)"
