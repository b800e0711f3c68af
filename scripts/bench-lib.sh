# Shell functions shared by the benchmark scripts (scripts/bench.sh,
# scripts/bench-presets.sh); sourced from the repository root, not run.
#
# The caller sets `dir` (a temporary directory) and may set `server` and
# `client` (PIDs): bench_cleanup, the EXIT trap, stops them and removes `dir`
# (kept with BENCH_KEEP=1).
# shellcheck shell=bash disable=SC2034,SC2154
# (SC2034: the variables are used by the callers; SC2154: `dir` and `bin` are set by them.)

server=""
client=""
hz=$(getconf CLK_TCK)

bench_cleanup() {
  if [ -n "$client" ]; then kill "$client" 2>/dev/null || true; fi
  if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; fi
  wait 2>/dev/null || true
  if [ "${BENCH_KEEP:-0}" = 1 ]; then echo "kept $dir" >&2; else rm -rf "$dir"; fi
}

now() { date +%s.%N; }
# utime + stime of a process, in clock ticks (fields 14 and 15 of /proc/PID/stat,
# counted after the ")" that ends the command name).
cpu_ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
# The largest RSS the process has had (KiB).
peak_rss_kib() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }
sleep_until() { local d; d=$(awk -v t="$1" -v n="$(now)" 'BEGIN {d = t - n; printf "%.3f", (d > 0 ? d : 0)}'); sleep "$d"; }

# "N cores, MODEL" of this machine.
machine() {
  local model
  model=$(awk -F': *' '/^model name/ {print $2; exit}' /proc/cpuinfo)
  echo "$(nproc) cores, ${model:-unknown CPU}"
}

# start_server CONFIG HTTP_PORT UDP_PORT DATA_DIR LOG: a whipgate (`$bin`) on
# 127.0.0.1, in the background (its PID in `server`); returns once it answers
# HTTP (non-zero when it does not within 10 s).
start_server() {
  WHIPGATE_LOG=info "$bin" serve --config "$1" --http-listen "127.0.0.1:$2" \
    --udp-listen "127.0.0.1:$3" --data-dir "$4" 2>"$5" &
  server=$!
  local _
  for _ in $(seq 100); do
    curl -s -o /dev/null -X OPTIONS "http://127.0.0.1:$2/whip/x" && return 0
    kill -0 "$server" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

# stop_server: stops the server started by start_server.
stop_server() {
  [ -n "$server" ] || return 0
  kill "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
  server=""
}
