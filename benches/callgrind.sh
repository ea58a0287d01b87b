#!/usr/bin/env bash
# Instructions per request, counted by valgrind's callgrind (steady whatever else the machine
# does), for sidecache and nginx side by side: pass-through, a rate-limited route (every request
# allowed) and cache hits. Each server runs alone under callgrind with one worker; one keep-alive
# curl sends MANY requests, then a second run sends FEW, and the difference divided by MANY - FEW
# is the cost of one request (start-up and shutdown cancel out). The share of each crate (from the
# source file of each function) comes from the same difference. Counting starts after the
# warm-up requests (callgrind_control --zero): quanta, the metrics exporter's clock, calibrates
# against the wall clock when first used, a few million instructions that vary with how fast
# valgrind runs, and would not cancel out.
#
# Usage: benches/callgrind.sh [many, default 4000] [few, default 1000]
#   CALLGRIND_ONLY="passthrough limited hit" runs only those scenarios.
#   CALLGRIND_BIN=path/to/another/sidecache counts that binary too (before/after in one run).
# Needs: valgrind, nginx, redis-server (Debian packages), cargo. Everything stays on 127.0.0.1;
# every process started here is stopped by pid on exit.
set -euo pipefail

MANY=${1:-4000}
FEW=${2:-1000}
ONLY=${CALLGRIND_ONLY:-passthrough limited hit}
OTHER=${CALLGRIND_BIN:-}
cd "$(dirname "$0")/.."
# shellcheck source=benches/common.sh
. benches/common.sh
for tool in valgrind callgrind_annotate callgrind_control nginx redis-server curl; do
  command -v "$tool" >/dev/null || { echo "callgrind: $tool is missing (apt-get install valgrind nginx-light redis-server curl)" >&2; exit 1; }
done
cargo build --release --quiet --bin sidecache --example bench-upstream

WORK=$(mktemp -d /tmp/sidecache-callgrind.XXXXXX)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
UP=$(free_port); RP=$(free_port); PORT=$(free_port); ADMIN=$(free_port)

target/release/examples/bench-upstream "127.0.0.1:$UP" &
PIDS+=($!)
redis-server --port "$RP" --bind 127.0.0.1 --save "" --appendonly no --dir "$WORK" --logfile "$WORK/redis.log" &
PIDS+=($!)
mkdir -p "$WORK/nginx-cache" && chmod 755 "$WORK" && chmod 777 "$WORK/nginx-cache"
cat >"$WORK/nginx.conf" <<NGINX
master_process off;
daemon off;
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
events { worker_connections 1024; }
NGINX
nginx_http "$WORK" "$UP" "$PORT" 16 >>"$WORK/nginx.conf"
cat >"$WORK/proxy.toml" <<TOML
[server]
listen = "127.0.0.1:$PORT"
workers = 1
[admin]
listen = "127.0.0.1:$ADMIN"
[upstream]
url = "http://127.0.0.1:$UP"
[redis]
url = "redis://127.0.0.1:$RP/0"
[log]
level = "warn"
[[route]]
name = "cached"
path = "/cached/*"
cache = { ttl = "60s" }
[[route]]
name = "limited"
path = "/limited/*"
rate_limit = { burst = 1000000000, rate = "1000000000/1s" }
TOML

# count SERVER PATH N -> callgrind output file of a run serving N requests to PATH, counted from
# after the warm-up
count() {
  local server=$1 path=$2 n=$3 out="$WORK/cg.$1.${2//\//_}.$3" pid
  case $server in
    nginx) valgrind --tool=callgrind --callgrind-out-file="$out" nginx -p "$WORK" -c "$WORK/nginx.conf" 2>"$out.log" & ;;
    sidecache) valgrind --tool=callgrind --callgrind-out-file="$out" target/release/sidecache --config "$WORK/proxy.toml" 2>"$out.log" >/dev/null & ;;
    other) valgrind --tool=callgrind --callgrind-out-file="$out" "$OTHER" --config "$WORK/proxy.toml" 2>"$out.log" >/dev/null & ;;
  esac
  pid=$!
  PIDS+=($pid)
  for _ in $(seq 1 600); do curl -fsS -o /dev/null "http://127.0.0.1:$PORT$path" 2>/dev/null && break; sleep 0.1; done
  if [ "$server" != nginx ]; then # the hot tier's invalidation link, so hits come from it
    for _ in $(seq 1 100); do curl -fsS "http://127.0.0.1:$ADMIN/metrics" | grep -q '^sidecache_redis_tracking_up{.*} 1' && break; sleep 0.1; done
  fi
  curl -fsS -o /dev/null "http://127.0.0.1:$PORT$path" # a warm cache entry, a warm upstream connection
  callgrind_control --zero "$pid" >/dev/null
  # One connection; the fragment is not sent, so every request is the same.
  curl -fsS -o /dev/null "http://127.0.0.1:$PORT$path#[1-$n]"
  kill -TERM "$pid"
  wait "$pid" 2>/dev/null || true
  echo "$out"
}
total() { awk '/^(summary|totals):/ {print $2; exit}' "$1"; }
# Instructions by crate: the registry crate, std, sidecache, or the shared object. The threads'
# entry frames, on the stack when counting was zeroed, are listed by callgrind_annotate with all
# their callees' cost as their own: a line with more than half of the total is one of those.
by_crate() {
  callgrind_annotate --auto=no --inclusive=no --threshold=100 "$1" 2>/dev/null | awk '
    /PROGRAM TOTALS/ { all = $1; gsub(",", "", all) }
    /^ *[0-9,]+ .*[^ ]:/ {
      n = $1; gsub(",", "", n); n += 0; if (n > all / 2) next
      f = $0; sub(/^ *[0-9,]+ +(\([^)]*\) +)?/, "", f)
      c = "other"
      if (match(f, /registry\/src\/[^\/]+\/[^\/]+\//)) { c = substr(f, RSTART, RLENGTH - 1); sub(/.*\//, "", c); sub(/-[0-9]+\.[0-9]+\.[0-9]+.*$/, "", c) }
      else if (f ~ /\/rustc\/|library\/(core|std|alloc)/) c = "std"
      else if (f ~ /^src\/|\/src\/(main|lib)\.rs|sidecache/) c = "sidecache"
      else if (match(f, /\[[^]]+\]$/)) { c = substr(f, RSTART + 1, RLENGTH - 2); sub(/.*\//, "", c) }
      t[c] += n
    }
    END { for (c in t) print c, t[c] }'
}
# per_request NAME SERVER PATH: "NAME instructions-per-request" and the crates' shares
per_request() {
  local name=$1 many few
  many=$(count "$2" "$3" "$MANY"); few=$(count "$2" "$3" "$FEW")
  local per=$(( ($(total "$many") - $(total "$few")) / (MANY - FEW) ))
  printf '%-28s %9d\n' "$name" "$per" | tee -a "$WORK/results"
  join -a1 -e0 -o 0,1.2,2.2 <(by_crate "$many" | sort) <(by_crate "$few" | sort) |
    awk -v d=$((MANY - FEW)) -v per="$per" '{ x = ($2 - $3) / d; if (x >= per / 50) printf "    %-24s %7.0f  %4.1f%%\n", $1, x, 100 * x / per }' | sort -k2 -rn
}

echo "instructions per request (valgrind --tool=callgrind, one worker, one keep-alive client, $MANY minus $FEW requests)"
for scenario in $ONLY; do
  case $scenario in
    passthrough) path=/ ;;
    limited) path=/limited/a ;;
    hit) path=/cached/a ;;
    *) echo "unknown scenario $scenario" >&2; exit 1 ;;
  esac
  per_request "sidecache $scenario" sidecache "$path"
  [ -n "$OTHER" ] && per_request "other sidecache $scenario" other "$path"
  per_request "nginx $scenario" nginx "$path"
done
echo
for scenario in $ONLY; do
  s=$(awk -v n="sidecache $scenario" '{k=$1" "$2} k==n {print $3}' "$WORK/results")
  g=$(awk -v n="nginx $scenario" '{k=$1" "$2} k==n {print $3}' "$WORK/results")
  awk -v s="$s" -v g="$g" -v n="$scenario" 'BEGIN { printf "%-12s sidecache/nginx instructions per request: %.2f\n", n, s / g }'
done
