#!/usr/bin/env bash
# sidecache benchmark, every comparison side by side in one run on loopback (wrk):
#   pass-through  direct upstream | sidecache | nginx keep-alive reverse proxy
#   cache hits    direct upstream | sidecache cache hits (Redis) | nginx proxy_cache hits
#   slow upstream (20 ms)  direct | through sidecache's cache
#   breaker open  sidecache pass-through route | sidecache cached route with Redis paused (SIGSTOP)
#   rate limit    sidecache pass-through | sidecache rate-limited route (Redis, every request
#                 allowed) | nginx limit_req allowing every request; then Redis scripts per
#                 allowed request on one bucket at a paced 1k and 10k req/s and flat out, and
#                 on many buckets (benches/paced.lua); and three replicas on one Redis asked past
#                 one bucket's limit for 10 s: admitted against burst + rate x t
#   Redis hang    16 connections on a cached and rate-limited route over 500 keys: healthy, then
#                 the first 6 s after its Redis is stopped (SIGSTOP), then the next 6 s (p50, p99,
#                 slowest request; medians of rounds)
#   coherence     a purge through one sidecache until another sharing its Redis answers a MISS
#                 (benches/coherence.py: p50, p99, max over many trials)
#   sealed        sidecache cache hits with entries sealed in Redis ([cache] encryption_key_env) or
#                 not: with the hot tier (hits mostly from process memory, never opened again) and
#                 with hot_ttl = "0s" (every hit read from Redis and opened)
# The backend is benches/upstream.rs (1 KiB bodies; 20 ms under /slow/). Targets of a comparison
# run in interleaved rounds and each figure is the median, so a noisy neighbour cannot favour one.
#
# Usage: benches/bench.sh [seconds per measurement, default 5] [connections, default 64] [rounds, default 3]
#   BENCH_ONLY="ratelimit passthrough" runs only those comparisons (passthrough cache slow breaker ratelimit sealed hang coherence).
#   BENCH_BASELINE=path/to/an/older/sidecache also runs that binary, same configuration, in the
#   pass-through and cache-hit rounds (before/after a change in one run).
# Needs: wrk, nginx, redis-server, redis-cli, bc (Debian packages), cargo. Everything stays on 127.0.0.1;
# every process started here is stopped by pid on exit.
set -euo pipefail

DURATION=${1:-5}
CONNECTIONS=${2:-64}
ROUNDS=${3:-3}
THREADS=2
ONLY=${BENCH_ONLY:-passthrough cache slow breaker ratelimit sealed hang coherence}
BASELINE=${BENCH_BASELINE:-}
want() { [[ " $ONLY " == *" $1 "* ]]; }
cd "$(dirname "$0")/.."
# shellcheck source=benches/common.sh
. benches/common.sh

for tool in wrk nginx redis-server redis-cli bc; do
  command -v "$tool" >/dev/null || { echo "bench: $tool is missing (apt-get install wrk nginx-light redis-server redis-tools bc)" >&2; exit 1; }
done
cargo build --release --quiet --bin sidecache --example bench-upstream
BIN=target/release/sidecache

WORK=$(mktemp -d /tmp/sidecache-bench.XXXXXX)
PIDS=()
REDIS_PID=
cleanup() {
  [ -n "$REDIS_PID" ] && kill -CONT "$REDIS_PID" 2>/dev/null || true
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

UP=$(free_port); NGX=$(free_port); SC=$(free_port); SCA=$(free_port); RP=$(free_port)
BL=$(free_port); BLA=$(free_port)

target/release/examples/bench-upstream "127.0.0.1:$UP" &
UP_PID=$!
PIDS+=($UP_PID)
redis-server --port "$RP" --bind 127.0.0.1 --save "" --appendonly no --dir "$WORK" --logfile "$WORK/redis.log" &
REDIS_PID=$!
PIDS+=($REDIS_PID)

# nginx's workers run as an unprivileged user: they must be able to write the cache.
mkdir -p "$WORK/nginx-cache"
chmod 755 "$WORK"
chmod 777 "$WORK/nginx-cache"
cat >"$WORK/nginx.conf" <<NGINX
worker_processes 2;
daemon off;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
events { worker_connections 4096; }
NGINX
nginx_http "$WORK" "$UP" "$NGX" 128 >>"$WORK/nginx.conf"
nginx -p "$WORK" -c "$WORK/nginx.conf" &
NGX_PID=$!
PIDS+=($NGX_PID)

cat >"$WORK/proxy.toml" <<TOML
[server]
listen = "127.0.0.1:$SC"
[admin]
listen = "127.0.0.1:$SCA"
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
name = "slow"
path = "/slow/*"
cache = { ttl = "60s" }
[[route]]
name = "limited"
path = "/limited/*"
rate_limit = { burst = 1000000000, rate = "1000000000/1s" }
[[route]]
name = "perclient"
path = "/perclient/*"
rate_limit = { burst = 1000000000, rate = "1000000000/1s", key = "header:x-client" }
[[route]]
name = "exact"
path = "/exact/*"
rate_limit = { burst = 500, rate = "3000/1s", key = "route" }
TOML
"$BIN" --config "$WORK/proxy.toml" >"$WORK/sidecache.log" 2>&1 &
SC_PID=$!
PIDS+=($SC_PID)
if [ -n "$BASELINE" ]; then
  sed -e "s/127.0.0.1:$SC\"/127.0.0.1:$BL\"/" -e "s/127.0.0.1:$SCA\"/127.0.0.1:$BLA\"/" "$WORK/proxy.toml" >"$WORK/baseline.toml"
  "$BASELINE" --config "$WORK/baseline.toml" >"$WORK/baseline.log" 2>&1 &
  BL_PID=$!
  PIDS+=($BL_PID)
  for _ in $(seq 1 100); do curl -fsS -o /dev/null "http://127.0.0.1:$BLA/readyz" 2>/dev/null && break; sleep 0.05; done
fi

# variant NAME CACHE_TABLE: another sidecache on the same configuration with its own ports, its own
# key prefix in the same Redis, and this [cache] table; its proxy port is in PORT_<NAME>.
variant() {
  local name=$1 port admin
  port=$(free_port); admin=$(free_port)
  sed -e "s/127.0.0.1:$SC\"/127.0.0.1:$port\"/" -e "s/127.0.0.1:$SCA\"/127.0.0.1:$admin\"/" \
    -e "s/^\[redis\]\$/[redis]\nkey_prefix = \"$name:\"/" "$WORK/proxy.toml" >"$WORK/$name.toml"
  printf '[cache]\n%b\n' "$2" >>"$WORK/$name.toml"
  BENCH_CACHE_KEY=$(head -c 32 /dev/urandom | base64) "$BIN" --config "$WORK/$name.toml" >"$WORK/$name.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 1 100); do curl -fsS "http://127.0.0.1:$admin/status" 2>/dev/null | grep -q '"state":"up"' && break; sleep 0.05; done
  printf -v "PORT_${name//-/_}" '%s' "$port"
}
if want sealed; then
  SEALED='encryption_key_env = "BENCH_CACHE_KEY"'
  variant plain-hot ''
  variant sealed-hot "$SEALED"
  variant plain-redis 'hot_ttl = "0s"'
  variant sealed-redis "$SEALED\nhot_ttl = \"0s\""
fi

for url in "http://127.0.0.1:$UP/" "http://127.0.0.1:$NGX/" "http://127.0.0.1:$SCA/readyz"; do
  for _ in $(seq 1 100); do curl -fsS -o /dev/null "$url" 2>/dev/null && break; sleep 0.05; done
done
for _ in $(seq 1 100); do curl -fsS "http://127.0.0.1:$SCA/status" | grep -q '"state":"up"' && break; sleep 0.05; done

# The processes whose CPU time a request costs: the server and what it calls (Redis for sidecache).
NGX_ALL="$NGX_PID $(pgrep -P "$NGX_PID" | tr '\n' ' ')"
SC_ALL="$SC_PID $REDIS_PID"
BL_ALL="${BL_PID:-} $REDIS_PID"

rss() { awk -v f="$2" '$1==f {print $2}' "/proc/$1/status"; }
IDLE_RSS=$(rss $SC_PID VmRSS:)

to_ms() { # wrk prints 512.00us / 1.23ms / 1.01s
  awk -v v="$1" 'BEGIN { n=v+0; if (v ~ /us$/) n/=1000; else if (v ~ /ms$/) n=n; else if (v ~ /s$/) n*=1000; printf "%.3f", n }'
}
# Server CPU time (user + system, clock ticks) of these pids and their threads so far.
ticks() { local t=0 p; for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0))); done; echo "$t"; }
HZ=$(getconf CLK_TCK)
# run NAME URL [UNIQUE_PREFIX] [PIDS] -> appends "NAME rps p50_ms p99_ms cpu_us_per_request [errors]"
# to results. With a prefix, every request goes to a path of its own under it
# (benches/unique-paths.lua); PIDS are the serving processes whose CPU time is counted.
run() {
  local name=$1 url=$2 pids=${4:-} args=()
  [ -n "${3:-}" ] && args=(-s benches/unique-paths.lua "$url" -- "$3") || args=("$url")
  wrk -t"$THREADS" -c"$CONNECTIONS" -d1s "${args[@]}" >/dev/null 2>&1 # warm-up (fills caches)
  local out rps p50 p99 errors before after requests cpu=-
  # shellcheck disable=SC2086
  before=$(ticks $pids)
  out=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency "${args[@]}")
  # shellcheck disable=SC2086
  after=$(ticks $pids)
  rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  requests=$(awk '/requests in/ {print $1}' <<<"$out")
  [ -n "$pids" ] && cpu=$(awk -v t=$((after - before)) -v hz="$HZ" -v n="$requests" 'BEGIN { printf "%.1f", t * 1e6 / hz / n }')
  errors=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out" | tr '\n' ' ')
  printf '%s %s %s %s %s %s\n' "$name" "$rps" "$(to_ms "$p50")" "$(to_ms "$p99")" "$cpu" "${errors:-}" >>"$WORK/results"
}
median() { awk -v n="$1" -v c="$2" '$1==n {print $c}' "$WORK/results" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
table() {
  printf '\n%-24s %12s %10s %10s %14s\n' "$1" "req/s" "p50 ms" "p99 ms" "CPU us/req"
  shift
  for name in "$@"; do
    printf '%-24s %12.0f %10s %10s %14s\n' "$name" "$(median "$name" 2)" "$(median "$name" 3)" "$(median "$name" 4)" "$(median "$name" 5)"
  done
}
ratio() { awk -v a="$(median "$1" "$3")" -v b="$(median "$2" "$3")" 'BEGIN { printf "%.2f", a/b }'; }
diff_ms() { awk -v a="$(median "$1" "$3")" -v b="$(median "$2" "$3")" 'BEGIN { printf "%+.3f", a-b }'; }

: >"$WORK/results"
echo "sidecache benchmark: wrk -t$THREADS -c$CONNECTIONS, ${DURATION}s x $ROUNDS interleaved rounds, 1 KiB bodies, $(nproc) cores"
for _ in $(seq 1 "$ROUNDS"); do
  if want passthrough || want ratelimit; then
    run direct "http://127.0.0.1:$UP/" "" "$UP_PID"
    run sidecache "http://127.0.0.1:$SC/" "" "$SC_ALL"
    [ -n "$BASELINE" ] && run baseline "http://127.0.0.1:$BL/" "" "$BL_ALL"
    run nginx "http://127.0.0.1:$NGX/" "" "$NGX_ALL"
  fi
  if want ratelimit; then
    run sidecache-limited "http://127.0.0.1:$SC/limited/a" "" "$SC_ALL"
    run nginx-limit_req "http://127.0.0.1:$NGX/limited/a" "" "$NGX_ALL"
  fi
  if want cache; then
    run direct-cached-path "http://127.0.0.1:$UP/cached/a" "" "$UP_PID"
    run sidecache-hits "http://127.0.0.1:$SC/cached/a" "" "$SC_ALL"
    [ -n "$BASELINE" ] && run baseline-hits "http://127.0.0.1:$BL/cached/a" "" "$BL_ALL"
    run nginx-proxy_cache-hits "http://127.0.0.1:$NGX/cached/a" "" "$NGX_ALL"
  fi
  if want slow; then
    run slow-direct "http://127.0.0.1:$UP/slow/a"
    run slow-sidecache-hits "http://127.0.0.1:$SC/slow/a" "" "$SC_ALL"
  fi
  if want sealed; then
    for name in plain-hot sealed-hot plain-redis sealed-redis; do
      port_var="PORT_${name//-/_}"
      run "$name" "http://127.0.0.1:${!port_var}/cached/a"
    done
  fi
done
LOAD_RSS=$(rss $SC_PID VmHWM:)
HITS=$(curl -fsS "http://127.0.0.1:$SCA/metrics" | awk '/^sidecache_cache_lookups_total\{route="cached",result="hit"\}/ {print $2}')
READS=$(curl -fsS "http://127.0.0.1:$SCA/metrics" | awk '/^sidecache_redis_op_duration_seconds_count\{client="cache",op="h(m)?get"\}/ {n += $2} END {print n + 0}')

# second NAME PROXY_PORT ADMIN_PORT BINARY TOML: another replica of a running sidecache (same
# configuration, same Redis and key prefix) on other ports.
second() {
  sed -e "s/127.0.0.1:$3\"/127.0.0.1:$6\"/" -e "s/127.0.0.1:$2\"/127.0.0.1:$5\"/" "$WORK/$4" >"$WORK/$1.toml"
  "$7" --config "$WORK/$1.toml" >"$WORK/$1.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 1 100); do curl -fsS "http://127.0.0.1:$6/status" 2>/dev/null | grep -q '"state":"up"' && break; sleep 0.05; done
  sleep 0.5 # the invalidation links
}
if want coherence; then
  SC2=$(free_port); SC2A=$(free_port)
  second replica "$SC" "$SCA" proxy.toml "$SC2" "$SC2A" "$BIN"
  COHERENCE=$(python3 benches/coherence.py "127.0.0.1:$SC" "127.0.0.1:$SCA" "127.0.0.1:$SC2" 300)
  if [ -n "$BASELINE" ]; then
    BL2=$(free_port); BL2A=$(free_port)
    second baseline-replica "$BL" "$BLA" baseline.toml "$BL2" "$BL2A" "$BASELINE"
    COHERENCE_BASELINE=$(python3 benches/coherence.py "127.0.0.1:$BL" "127.0.0.1:$BLA" "127.0.0.1:$BL2" 20)
  fi
fi

# Redis commands per allowed request on a rate-limited route: one bucket at a paced 1k and 10k
# req/s and as fast as wrk goes, then many buckets (a header value per request out of 100,000);
# then three replicas sharing one bucket.
if want ratelimit; then
  # rl_cost NAME PATH CONNECTIONS DELAY_MS [HEADER COUNT] -> "NAME req/s scripts-per-allowed-request"
  rl_cost() {
    local route=${2#/} before after allowed0 allowed1 out
    route=${route%%/*}
    evalsha() { redis-cli -p "$RP" info commandstats | awk -F'[:=,]' '/^cmdstat_(evalsha|eval):/ {n += $3} END {print n + 0}'; }
    allowed() { curl -fsS "http://127.0.0.1:$SCA/metrics" | awk -v r="route=\"$route\"" 'index($0, "sidecache_ratelimit_checks_total{") == 1 && index($0, r) && /result="allowed"/ {n += $2} END {print n + 0}'; }
    before=$(evalsha); allowed0=$(allowed)
    out=$(wrk -t2 -c"$3" -d"${DURATION}s" -s benches/paced.lua "http://127.0.0.1:$SC$2" -- "$4" ${5:-} ${6:-})
    after=$(evalsha); allowed1=$(allowed)
    printf '%s %s %s\n' "$1" "$(awk '/^Requests\/sec/ {printf "%.0f", $2}' <<<"$out")" \
      "$(awk -v c=$((after - before)) -v a=$((allowed1 - allowed0)) 'BEGIN { printf "%.4f", a ? c / a : 0 }')" >>"$WORK/rl-cost"
  }
  rl_cost one-bucket-1k /limited/a 10 10
  rl_cost one-bucket-10k /limited/a 24 1
  rl_cost one-bucket-max /limited/a 32 0
  rl_cost per-client-max /perclient/a 32 0 X-Client 100000

  # Three replicas on one Redis, each asked past the limit for 10 s (route "exact", one bucket of
  # burst 500 and 3000/s): admitted against burst + rate x t, t from before the first request was
  # sent to after the last answer (so the bound is if anything generous by a few ms of rate).
  R2=$(free_port); R2A=$(free_port); R3=$(free_port); R3A=$(free_port)
  second rl-replica-2 "$SC" "$SCA" proxy.toml "$R2" "$R2A" "$BIN"
  second rl-replica-3 "$SC" "$SCA" proxy.toml "$R3" "$R3A" "$BIN"
  # admitted ADMIN_PORT -> allowed checks of route "exact" (from Redis, from a lease, failed open)
  admitted() { curl -fsS "http://127.0.0.1:$1/metrics" | awk 'index($0, "sidecache_ratelimit_checks_total{") == 1 && /route="exact"/ && (/result="allowed"/ || /backend="allow_all"/) {n += $2} END {print n + 0}'; }
  failed_open() { curl -fsS "http://127.0.0.1:$1/metrics" | awk 'index($0, "sidecache_ratelimit_checks_total{") == 1 && /route="exact"/ && /backend="allow_all"/ {n += $2} END {print n + 0}'; }
  started=$(date +%s.%N)
  wrk_pids=()
  for port in "$SC" "$R2" "$R3"; do
    wrk -t1 -c8 -d10s "http://127.0.0.1:$port/exact/a" >"$WORK/exact-$port" &
    wrk_pids+=($!)
  done
  wait "${wrk_pids[@]}"
  ended=$(date +%s.%N)
  EXACT_ADMITTED=$(( $(admitted "$SCA") + $(admitted "$R2A") + $(admitted "$R3A") ))
  EXACT_FAILED_OPEN=$(( $(failed_open "$SCA") + $(failed_open "$R2A") + $(failed_open "$R3A") ))
  EXACT_SECONDS=$(awk -v a="$started" -v b="$ended" 'BEGIN { printf "%.3f", b - a }')
  EXACT_ASKED=$(awk '/requests in/ {n += $1} END {print n + 0}' "$WORK"/exact-*)
fi

if want hang; then
  # A sidecache of its own on a Redis of its own, which this stops and resumes.
  HRP=$(free_port); HSC=$(free_port); HSCA=$(free_port)
  redis-server --port "$HRP" --bind 127.0.0.1 --save "" --appendonly no --dir "$WORK" --logfile "$WORK/hang-redis.log" &
  HANG_REDIS=$!
  PIDS+=($HANG_REDIS)
  cat >"$WORK/hang.toml" <<TOML
[server]
listen = "127.0.0.1:$HSC"
[admin]
listen = "127.0.0.1:$HSCA"
[upstream]
url = "http://127.0.0.1:$UP"
[redis]
url = "redis://127.0.0.1:$HRP/0"
[log]
level = "warn"
[[route]]
name = "both"
path = "/both/*"
cache = { ttl = "60s" }
rate_limit = { burst = 1000000000, rate = "1000000000/1s" }
TOML
  "$BIN" --config "$WORK/hang.toml" >"$WORK/hang.log" 2>&1 &
  PIDS+=($!)
  hang_up() { for _ in $(seq 1 200); do curl -fsS "http://127.0.0.1:$HSCA/status" 2>/dev/null | grep -q '"state":"up"' && ! curl -fsS "http://127.0.0.1:$HSCA/status" | grep -q '"state":"down\|"state":"probing' && break; sleep 0.05; done; }
  # hang_run NAME -> appends "NAME p50 p99 max" to hang-results
  hang_run() {
    local out
    out=$(wrk -t2 -c16 -d6s --latency -s benches/cycle-paths.lua "http://127.0.0.1:$HSC/both/" -- /both/ 500)
    printf '%s %s %s %s\n' "$1" "$(to_ms "$(awk '$1=="50%" {print $2}' <<<"$out")")" \
      "$(to_ms "$(awk '$1=="99%" {print $2}' <<<"$out")")" "$(to_ms "$(awk '$1=="Latency" {print $4}' <<<"$out")")" >>"$WORK/hang-results"
    awk '/Non-2xx|Socket errors/' <<<"$out"
  }
  for _ in $(seq 1 "$ROUNDS"); do
    hang_up
    wrk -t2 -c16 -d2s -s benches/cycle-paths.lua "http://127.0.0.1:$HSC/both/" -- /both/ 500 >/dev/null
    hang_run healthy
    kill -STOP "$HANG_REDIS"
    hang_run paused-first-6s
    hang_run paused-next-6s
    kill -CONT "$HANG_REDIS"
  done
fi

if want breaker; then
  kill -STOP "$REDIS_PID"
  for _ in $(seq 1 100); do curl -fsS "http://127.0.0.1:$SCA/status" | grep -q '"state":"up"' || break; curl -fsS -o /dev/null "http://127.0.0.1:$SC/cached/b"; done
  # Distinct paths on both routes: every cached-route request is a miss that skips Redis (the
  # breaker is open) and none can be coalesced with another.
  for _ in $(seq 1 "$ROUNDS"); do
    run redis-paused-passthrough "http://127.0.0.1:$SC/" /p/ "$SC_PID"
    run redis-paused-cached-route "http://127.0.0.1:$SC/cached/" /cached/ "$SC_PID"
  done
  kill -CONT "$REDIS_PID"
fi
LIMITED=$(curl -fsS "http://127.0.0.1:$SCA/metrics" | awk '/^sidecache_ratelimit_checks_total\{route="limited",result="allowed",backend="redis"\}/ {print $2}')

want passthrough && table "pass-through" direct sidecache ${BASELINE:+baseline} nginx
want ratelimit && table "rate limit (all allowed)" sidecache sidecache-limited nginx nginx-limit_req
want cache && table "cache hits" direct-cached-path sidecache-hits ${BASELINE:+baseline-hits} nginx-proxy_cache-hits
want slow && table "20 ms upstream" slow-direct slow-sidecache-hits
want breaker && table "Redis paused (breaker open)" redis-paused-passthrough redis-paused-cached-route
want sealed && table "cache hits, sealed or not" plain-hot sealed-hot plain-redis sealed-redis
errors=$(awk 'NF > 5' "$WORK/results")
[ -z "$errors" ] || printf '\nerrors reported by wrk:\n%s\n' "$errors"

echo
want passthrough && echo "pass-through  sidecache/nginx: throughput $(ratio sidecache nginx 2), p50 $(ratio sidecache nginx 3), p99 $(ratio sidecache nginx 4)"
want ratelimit && echo "rate limit    limited/sidecache pass-through: throughput $(ratio sidecache-limited sidecache 2), p99 $(ratio sidecache-limited sidecache 4); limited/nginx limit_req: throughput $(ratio sidecache-limited nginx-limit_req 2), p99 $(ratio sidecache-limited nginx-limit_req 4)  (checks by Redis: ${LIMITED:-0})"
if [ -n "$BASELINE" ]; then
  want passthrough && echo "pass-through  baseline/nginx: throughput $(ratio baseline nginx 2), p50 $(ratio baseline nginx 3), p99 $(ratio baseline nginx 4); sidecache/baseline: throughput $(ratio sidecache baseline 2), p99 $(ratio sidecache baseline 4)"
  want cache && echo "cache hits    baseline/nginx proxy_cache: throughput $(ratio baseline-hits nginx-proxy_cache-hits 2), p99 $(ratio baseline-hits nginx-proxy_cache-hits 4); sidecache/baseline: throughput $(ratio sidecache-hits baseline-hits 2), p99 $(ratio sidecache-hits baseline-hits 4)"
fi
want cache && echo "cache hits    sidecache/nginx proxy_cache: throughput $(ratio sidecache-hits nginx-proxy_cache-hits 2), p50 $(ratio sidecache-hits nginx-proxy_cache-hits 3), p99 $(ratio sidecache-hits nginx-proxy_cache-hits 4), CPU per request $(ratio sidecache-hits nginx-proxy_cache-hits 5)  (hits counted: ${HITS:-0}; Redis reads per hit: $(awk -v r="${READS:-0}" -v h="${HITS:-1}" 'BEGIN { printf "%.5f", r / h }'))"
want passthrough && echo "pass-through  CPU per request sidecache/nginx: $(ratio sidecache nginx 5)"
if want coherence; then
  read -r n p50 p99 max <<<"$COHERENCE"
  echo "coherence     a purge through one replica until the other answers a MISS: p50 $p50 ms, p99 $p99 ms, max $max ms ($n trials)"
  if [ -n "$BASELINE" ]; then
    read -r n p50 p99 max <<<"$COHERENCE_BASELINE"
    echo "              baseline: p50 $p50 ms, p99 $p99 ms, max $max ms ($n trials)"
  fi
fi
want slow && echo "20 ms upstream  through the cache/direct: throughput $(ratio slow-sidecache-hits slow-direct 2), p50 $(ratio slow-sidecache-hits slow-direct 3)"
want sealed && echo "sealed        with the hot tier sealed/plain: throughput $(ratio sealed-hot plain-hot 2), p99 $(ratio sealed-hot plain-hot 4); every hit from Redis sealed/plain: throughput $(ratio sealed-redis plain-redis 2), p99 $(ratio sealed-redis plain-redis 4)"
if want ratelimit; then
  while read -r name rps per; do
    printf 'rate limit    %-16s %7s req/s  Redis scripts per allowed request %s\n' "$name" "$rps" "$per"
  done <"$WORK/rl-cost"
  awk -v a="$EXACT_ADMITTED" -v f="$EXACT_FAILED_OPEN" -v t="$EXACT_SECONDS" -v asked="$EXACT_ASKED" 'BEGIN {
    bound = 500 + 3000 * t
    printf "rate limit    3 replicas, one bucket (burst 500, 3000/s), %.2f s, %d asked: admitted %d of burst + rate x t = %.0f (%.1f%%; %d failed open)%s\n",
      t, asked, a, bound, 100 * a / bound, f, (a > bound ? "  OVER THE LIMIT" : "")
  }'
fi
if want hang; then
  hang_median() { awk -v n="$1" -v c="$2" '$1==n {print $c}' "$WORK/hang-results" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
  for phase in healthy paused-first-6s paused-next-6s; do
    printf 'Redis hang    %-16s p50 %7.3f ms  p99 %7.3f ms  slowest %8.3f ms\n' "$phase" "$(hang_median $phase 2)" "$(hang_median $phase 3)" "$(hang_median $phase 4)"
  done
fi
want breaker && echo "breaker open  cached route - pass-through: p50 $(diff_ms redis-paused-cached-route redis-paused-passthrough 3) ms, p99 $(diff_ms redis-paused-cached-route redis-paused-passthrough 4) ms"
printf 'sidecache RSS: idle %.1f MiB, peak under load %.1f MiB\n' "$(echo "$IDLE_RSS/1024" | bc -l)" "$(echo "$LOAD_RSS/1024" | bc -l)"
