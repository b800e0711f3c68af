#!/usr/bin/env bash
# Benchmark: N concurrent `whipgate publish` sessions (samples/sample.mkv, looped,
# each to its own stream) against a release whipgate on 127.0.0.1, for each N
# in a list, with the load generator on the same machine. Prints one row per N:
# server CPU (% of one core, total and per stream) and RSS over the steady part,
# setup (POST -> 201) and first-segment delay percentiles, frames dropped, and
# whether every stream's playlist advanced. Stops early when sessions fail.
#
#   usage: scripts/bench.sh [N ...]
#   env:   BENCH_SESSIONS   list of N when no arguments are given (default "1 10 25 50")
#          BENCH_DURATION   seconds each session publishes (default 20)
#          BENCH_RAMP       new sessions per second (default 20)
#          BENCH_HTTP_PORT, BENCH_UDP_PORT   server ports (default 18680, 18689)
#          BENCH_KEEP=1     keep the temporary directory (logs, HLS) for a look
#          BENCH_PRESET     the streams' preset (default passthrough; copy-all: no transcoding)
#          BENCH_HLS_FORMAT hls.format: mpegts (default), fmp4 or llhls
#          BENCH_STACK      the generator's WebRTC sender: auto (default: lean), lean or str0m
set -euo pipefail
cd "$(dirname "$0")/.."

list="${*:-${BENCH_SESSIONS:-1 10 25 50}}"
duration="${BENCH_DURATION:-20}"
ramp="${BENCH_RAMP:-20}"
http_port="${BENCH_HTTP_PORT:-18680}"
udp_port="${BENCH_UDP_PORT:-18689}"
preset="${BENCH_PRESET:-passthrough}"
format="${BENCH_HLS_FORMAT:-mpegts}"
stack="${BENCH_STACK:-auto}"
base="http://127.0.0.1:$http_port"

cargo build --release -q
bin=target/release/whipgate
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
dir=$(mktemp -d)
trap bench_cleanup EXIT

# p50 and p99 (nearest rank) of the numbers on stdin, "-" without any.
p50_p99() {
  sort -n | awk '{v[NR] = $1} END {
    if (NR == 0) { print "-/-"; exit }
    r50 = int((NR * 50 + 99) / 100); r99 = int((NR * 99 + 99) / 100);
    printf "%.0f/%.0f", v[r50], v[r99] }'
}
# The last segment listed in a stream's playlist ("" when there is none yet).
last_segment() {
  local last
  last=$({ grep -v '^#' "$dir/data/hls/$1/index.m3u8" 2>/dev/null || true; } | tail -n 1)
  echo "$last"
}

echo "whipgate benchmark: samples/sample.mkv (640x360 30 fps H264 + Opus stereo, looped),"
echo "  ${duration} s per session, ramp ${ramp} sessions/s, server and load generator on this"
echo "  machine ($(machine)); one fresh server per N."
case "$preset" in
  passthrough) echo "preset: passthrough (the default: H264 copied, Opus -> AAC, MPEG-TS HLS)." ;;
  copy-all) echo "preset: copy-all (no transcoding: H264 copied; Opus copied into fMP4, dropped from MPEG-TS)." ;;
  *) echo "preset: $preset" ;;
esac
printf '[stream_defaults]\npreset = "%s"\n[hls]\nformat = "%s"\n' "$preset" "$format" >"$dir/whipgate.toml"
echo "HLS format: $format."
echo "CPU: server utime+stime over the steady part (all sessions up), % of one core;"
echo "RSS: at the end of the steady part; per stream = (RSS - idle RSS) / N."
echo
fmt="%5s %9s %9s %8s %9s %8s %11s %13s %8s %9s %8s\n"
# shellcheck disable=SC2059
printf "$fmt" N up/failed cpu_% cpu_%/str rss_MiB MiB/str setup_ms_p50/99 firstseg_ms_p50/99 dropped advanced gen_cpu_%

for n in $list; do
  run="$dir/n$n"
  mkdir -p "$run"
  rm -rf "$dir/data"
  start_server "$dir/whipgate.toml" "$http_port" "$udp_port" "$dir/data" "$run/server.log" || {
    echo "N=$n: the server did not start:" >&2; tail -n 5 "$run/server.log" >&2; break; }
  sleep 0.5
  rss_idle=$(rss_kib "$server")

  start=$(now)
  WHIPGATE_LOG=warn "$bin" publish samples/sample.mkv "$base/whip/bench{n}" \
    --sessions "$n" --ramp "$ramp" --duration "$duration" --loop --stack "$stack" \
    >"$run/summary.txt" 2>"$run/publish.log" &
  client=$!
  # Steady part: from 1.5 s after the last session started to 0.5 s before the first ends.
  t_a=$(awk -v s="$start" -v n="$n" -v r="$ramp" 'BEGIN {printf "%.3f", s + (n - 1) / r + 1.5}')
  t_b=$(awk -v s="$start" -v d="$duration" 'BEGIN {printf "%.3f", s + d - 0.5}')
  if awk -v a="$t_a" -v b="$t_b" 'BEGIN {exit !(b - a < 2)}'; then
    echo "N=$n: the steady part is shorter than 2 s; raise BENCH_DURATION or BENCH_RAMP" >&2
    break
  fi
  sleep_until "$t_a"
  cpu_a=$(cpu_ticks "$server"); gen_a=$(cpu_ticks "$client"); ta=$(now)
  for i in $(seq 0 $((n - 1))); do last_segment "bench$i"; done >"$run/seg_a"
  sleep_until "$t_b"
  cpu_b=$(cpu_ticks "$server"); gen_b=$(cpu_ticks "$client" 2>/dev/null || echo "$gen_a"); tb=$(now)
  rss_b=$(rss_kib "$server")
  for i in $(seq 0 $((n - 1))); do last_segment "bench$i"; done >"$run/seg_b"
  rc=0
  wait "$client" || rc=$?
  client=""
  dropped=$({ curl -s "$base/api/v1/streams" || true; } | { grep -o '"dropped_frames":[0-9]*' || true; } \
    | awk -F: '{s += $2} END {print s + 0}')
  stop_server

  advanced=$(paste "$run/seg_a" "$run/seg_b" | awk -F'\t' '$2 != "" && $1 != $2 {a++} END {print a + 0}')
  up=$(grep -o 'up=[0-9]*' "$run/summary.txt" | cut -d= -f2 || true)
  failed=$(grep -o 'failed=[0-9]*' "$run/summary.txt" | cut -d= -f2 || true)
  setup=$({ grep '^POST->201' "$run/summary.txt" || true; } | awk '{
    for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
    if (v["p50"] == "") print "-/-"; else printf "%.1f/%.1f", v["p50"], v["p99"] }')
  sed 's/\x1b\[[0-9;]*m//g' "$run/server.log" >"$run/plain.log"
  firstseg=$({ grep -o 'since_first_frame_ms=[0-9.]*' "$run/plain.log" || true; } | cut -d= -f2 | p50_p99)
  discarded=$({ grep 'discarded frames' "$run/plain.log" || true; } | { grep -o 'dropped=[0-9]*' || true; } \
    | awk -F= '{s += $2} END {print s + 0}')
  [ "$discarded" -gt "$dropped" ] && dropped=$discarded
  read -r cpu cpu_per gen_cpu rss rss_per < <(awk -v ca="$cpu_a" -v cb="$cpu_b" -v ga="$gen_a" \
    -v gb="$gen_b" -v ta="$ta" -v tb="$tb" -v hz="$hz" -v n="$n" -v ri="$rss_idle" -v rb="$rss_b" \
    'BEGIN {
       secs = tb - ta; cpu = (cb - ca) / hz / secs * 100; gen = (gb - ga) / hz / secs * 100;
       printf "%.1f %.2f %.1f %.1f %.2f\n", cpu, cpu / n, gen, rb / 1024, (rb - ri) / 1024 / n }')
  # shellcheck disable=SC2059
  printf "$fmt" "$n" "${up:-?}/${failed:-?}" "$cpu" "$cpu_per" "$rss" "$rss_per" "$setup" \
    "$firstseg" "$dropped" "$advanced/$n" "$gen_cpu"
  if [ "$rc" -ne 0 ] || [ "${failed:-1}" != 0 ] || [ "${up:-0}" != "$n" ] || [ "$advanced" != "$n" ]; then
    echo "N=$n: sessions failed or streams stalled (publish exit $rc); stopping here." >&2
    echo "  publish summary:" >&2
    sed 's/^/    /' "$run/summary.txt" >&2
    break
  fi
done
