#!/usr/bin/env bash
# Benchmark: what each shipped preset costs, to size a machine. For each preset
# (presets/*.toml, or those given as arguments) and each source, starts a fresh
# release whipgate on 127.0.0.1 with that preset as the stream default, publishes
# the source (looped, one session) with `whipgate publish`, and measures the
# server's own CPU time (utime + stime, /proc/PID/stat) over a steady window
# that leaves the start-up out. The publisher sends in real time, so a wall
# second of the window is a media second: prints one row per run with CPU
# seconds per media second (= % of one core / 100), peak RSS, the HLS seconds
# each rendition's playlist gained in the window (the master playlist must
# list every rendition, and every rendition must advance), frames dropped,
# and each rendition's size and frame rate (ffprobe of its last segment).
# A benchmark, not a test: it is not part of scripts/test.sh.
#
#   usage: scripts/bench-presets.sh [PRESET ...]
#   env:   BENCH_SOURCES   what is published (default "sample"): "sample" is
#                          samples/sample.mkv (640x360 30 fps H264 + Opus); "720p"
#                          and "1080p" are made from FFmpeg's testsrc2 at that
#                          size (30 fps, H264 baseline) with the sample's Opus,
#                          once, cached in target/bench-samples/
#          BENCH_WARMUP    seconds after the publish starts that are not measured (default 8)
#          BENCH_WINDOW    seconds measured (default 30)
#          BENCH_MAX_LOAD  before each run, wait (at most BENCH_QUIET_WAIT s, default
#                          120) for the 1-minute load average to fall below this
#          BENCH_HTTP_PORT, BENCH_UDP_PORT   first ports tried (default 18690, 18699;
#                          the next free ones are taken)
#          BENCH_KEEP=1    keep the temporary directory (logs, HLS) for a look
#          BENCH_BUILD=0   use target/release/whipgate as it is (no cargo build)
set -euo pipefail
cd "$(dirname "$0")/.."

sources="${BENCH_SOURCES:-sample}"
warmup="${BENCH_WARMUP:-8}"
window="${BENCH_WINDOW:-30}"
max_load="${BENCH_MAX_LOAD:-}"
quiet_wait="${BENCH_QUIET_WAIT:-120}"

# The shipped presets, cheapest first; other files after them.
presets="$*"
if [ -z "$presets" ]; then
  for p in passthrough copy-all audio-only screen abr-720p abr-1080p; do
    [ -f "presets/$p.toml" ] && presets="$presets $p"
  done
  for f in presets/*.toml; do
    p=$(basename "$f" .toml)
    case " $presets " in *" $p "*) ;; *) presets="$presets $p" ;; esac
  done
fi

[ "${BENCH_BUILD:-1}" = 0 ] || cargo build --release -q
bin=target/release/whipgate
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
dir=$(mktemp -d)
trap bench_cleanup EXIT

# The first port from $2 on that nothing listens on (ss -t or -u: $1).
free_port() {
  local p=$2
  while [ -n "$(ss -Hn"$1"l "sport = :$p" 2>/dev/null)" ]; do
    p=$((p + 1))
    [ "$p" -lt $(($2 + 100)) ] || { echo "no free port from $2" >&2; return 1; }
  done
  echo "$p"
}
http_port=$(free_port t "${BENCH_HTTP_PORT:-18690}")
udp_port=$(free_port u "${BENCH_UDP_PORT:-18699}")
base="http://127.0.0.1:$http_port"

# The file published for source $1, made the first time for 720p and 1080p.
source_file() {
  local size rate out
  case "$1" in
    sample) echo samples/sample.mkv; return ;;
    720p) size=1280x720; rate=2500 ;;
    1080p) size=1920x1080; rate=4500 ;;
    *) echo "unknown source $1 (sample, 720p or 1080p)" >&2; return 1 ;;
  esac
  out="target/bench-samples/sample-$size.mkv"
  if [ ! -f "$out" ]; then
    echo "making $out (10 s, testsrc2 $size 30 fps, the sample's Opus)..." >&2
    mkdir -p target/bench-samples
    ffmpeg -hide_banner -loglevel error -y \
      -f lavfi -i "testsrc2=size=$size:rate=30:duration=10" -i samples/sample.mkv \
      -map 0:v -map 1:a -c:a copy \
      -c:v libx264 -profile:v baseline -level 4.0 -preset veryfast -tune zerolatency \
      -g 30 -keyint_min 30 -sc_threshold 0 -bf 0 \
      -b:v "${rate}k" -maxrate "$((rate * 11 / 10))k" -bufsize "${rate}k" \
      -t 10 "$out.tmp.mkv"
    mv "$out.tmp.mkv" "$out"
  fi
  echo "$out"
}

wait_quiet() {
  [ -n "$max_load" ] || return 0
  local end=$(($(date +%s) + quiet_wait))
  while awk -v m="$max_load" '{exit !($1 >= m)}' /proc/loadavg && [ "$(date +%s)" -lt "$end" ]; do
    sleep 5
  done
}

# Appends "TAG RENDITION URI SECONDS" for every segment listed by the stream's
# media playlists ("." for a stream with one playlist, else the rendition's
# directory under the master playlist).
snapshot() {
  local f r
  for f in "$hls/index.m3u8" "$hls"/*/index.m3u8; do
    [ -f "$f" ] || continue
    r=${f#"$hls"/}
    r=${r%index.m3u8}
    r=${r%/}
    awk -v t="$1" -v r="${r:-.}" '
      /^#EXTINF:/ { d = substr($0, 9); sub(/,.*/, "", d); next }
      /^#/ || NF == 0 { next }
      d != "" { print t, r, $0, d; d = "" }' "$f" 2>/dev/null || true
  done
}

# "WxH@FPS" of a segment file ($1) lasting $2 s, "audio" without video.
describe_segment() {
  local info
  info=$(ffprobe -v error -select_streams v:0 -count_packets \
    -show_entries stream=width,height,nb_read_packets -of csv=p=0 "$1" 2>/dev/null | head -n 1 || true)
  if [ -z "$info" ]; then echo audio; return; fi
  echo "$info" | awk -F, -v d="$2" '{printf "%sx%s@%.0f", $1, $2, (d > 0 ? $3 / d : 0)}'
}

echo "whipgate preset benchmark: one publisher per run (whipgate publish --loop, real time),"
echo "  ${warmup} s warm-up not measured, then a ${window} s window; server and publisher on"
echo "  this machine: $(machine); whipgate $(git describe --always --dirty 2>/dev/null || echo '?')."
echo "cpu_s/media_s: server utime+stime over the window / window length (a media second is a"
echo "  wall second); core_%: the same as % of one core; peak_rss: VmHWM at the end of the window;"
echo "hls_s: HLS seconds the slowest rendition's playlist gained in the window (whole segments);"
echo "dropped: whipgate_frames_dropped_total; load1: 1-minute load average at the end of the window."
echo
fmt="%-11s %-7s %13s %7s %13s %11s %8s %6s  %s\n"
# shellcheck disable=SC2059
printf "$fmt" preset source cpu_s/media_s core_% peak_rss_MiB hls_s dropped load1 "renditions (size@fps) / status"

# Sources first: making them must not happen during a measurement.
files=""
for s in $sources; do
  files="$files $(source_file "$s")"
done
read -r -a files <<<"$files"

status=0
i=0
for s in $sources; do
  file=${files[$i]}
  i=$((i + 1))
  for preset in $presets; do
    run="$dir/$preset-$s"
    mkdir -p "$run"
    hls="$run/data/hls/bench"
    # The preset file alone in a presets directory of its own (an unfinished
    # file elsewhere in presets/ does not stop the server); without a file, the
    # preset built into the binary.
    mkdir -p "$run/presets"
    if [ -f "presets/$preset.toml" ]; then cp "presets/$preset.toml" "$run/presets/"; fi
    printf '[server]\npresets_dir = "%s"\n[stream_defaults]\npreset = "%s"\n' \
      "$run/presets" "$preset" >"$run/whipgate.toml"
    wait_quiet
    if ! start_server "$run/whipgate.toml" "$http_port" "$udp_port" "$run/data" "$run/server.log"; then
      # shellcheck disable=SC2059
      printf "$fmt" "$preset" "$s" - - - - - - "FAIL: the server did not start"
      sed 's/^/    /' "$run/server.log" | head -n 3 >&2
      stop_server
      status=1
      continue
    fi
    start=$(now)
    WHIPGATE_LOG=warn "$bin" publish "$file" "$base/whip/bench" --loop \
      --duration "$((warmup + window + 2))" >"$run/publish.out" 2>"$run/publish.log" &
    client=$!
    ta=$(awk -v s="$start" -v w="$warmup" 'BEGIN {printf "%.3f", s + w}')
    sleep_until "$ta"
    cpu_a=$(cpu_ticks "$server" 2>/dev/null || echo gone); ta=$(now)
    snapshot 0 >"$run/segments"
    for k in $(seq "$window"); do
      sleep_until "$(awk -v a="$ta" -v k="$k" 'BEGIN {printf "%.3f", a + k}')"
      if [ "$k" = "$window" ]; then
        cpu_b=$(cpu_ticks "$server" 2>/dev/null || echo gone); tb=$(now)
        rss=$(peak_rss_kib "$server" 2>/dev/null || echo 0)
        load1=$(cut -d' ' -f1 /proc/loadavg)
      fi
      snapshot 1 >>"$run/segments"
    done

    # The renditions: those the master playlist lists, or the one playlist.
    master=$(curl -sf -m 5 "$base/hls/bench/index.m3u8" || true)
    problem=""
    if grep -q '^#EXT-X-STREAM-INF' <<<"$master"; then
      names=$(grep -v '^#' <<<"$master" | sed -n 's,/index\.m3u8$,,p')
    elif grep -q '^#EXTINF' <<<"$master"; then
      names="."
    else
      names=""
      problem="no playlist at /hls/bench/index.m3u8"
    fi
    # More rendition directories on disk than the master lists?
    on_disk=$(awk '$2 != "." {print $2}' "$run/segments" | sort -u | wc -l)
    listed=$(awk 'NF && $0 != "."' <<<"$names" | wc -l)
    if [ -n "$names" ] && [ "$on_disk" -gt "$listed" ]; then
      problem="the master playlist lists $listed renditions, $on_disk on disk"
    fi
    gained=$(awk '$1 == 0 {base[$2 " " $3] = 1; next}
      !(($2 " " $3) in base) && !(($2 " " $3) in seen) {seen[$2 " " $3] = 1; s[$2] += $4}
      END {for (r in s) print r, s[r]}' "$run/segments")
    min=""
    renditions=""
    for r in $names; do
      g=$(awk -v r="$r" '$1 == r {print $2}' <<<"$gained")
      g=${g:-0}
      min=$(awk -v m="${min:-1e9}" -v g="$g" 'BEGIN {printf "%.1f", (g < m ? g : m)}')
      if [ "$r" = . ]; then pl="$hls/index.m3u8"; url="$base/hls/bench/index.m3u8"; else
        pl="$hls/$r/index.m3u8"; url="$base/hls/bench/$r/index.m3u8"; fi
      curl -sf -m 5 "$url" | grep -q '^#EXTINF' || problem="${problem:+$problem; }$r: no segments served at $url"
      [ "$g" != 0 ] || problem="${problem:+$problem; }$r: its playlist did not advance"
      last=$({ grep -v '^#' "$pl" 2>/dev/null || true; } | tail -n 1)
      lastd=$({ grep '^#EXTINF:' "$pl" 2>/dev/null || true; } | tail -n 1 | sed 's/^#EXTINF:\([0-9.]*\).*/\1/')
      desc="?"
      if [ -n "$last" ]; then desc=$(describe_segment "$(dirname "$pl")/$last" "${lastd:-0}"); fi
      if [ "$r" = . ]; then renditions="$desc"; else renditions="${renditions:+$renditions, }$r $desc"; fi
    done
    dropped=$({ curl -s -m 5 "$base/metrics" || true; } | awk '/^whipgate_frames_dropped_total/ {s += $NF} END {print s + 0}')

    rc=0
    wait "$client" || rc=$?
    client=""
    stop_server
    [ "$rc" = 0 ] || problem="${problem:+$problem; }publish exited with $rc"
    if [ "$cpu_a" = gone ] || [ "$cpu_b" = gone ]; then
      problem="${problem:+$problem; }the server exited during the run"; cpu_a=0; cpu_b=0
    fi
    if awk -v m="${min:-0}" -v w="$window" 'BEGIN {exit !(m < 0.8 * w)}'; then
      problem="${problem:+$problem; }HLS fell behind real time"
    fi

    read -r per core rss_mib < <(awk -v ca="$cpu_a" -v cb="$cpu_b" -v ta="$ta" -v tb="$tb" \
      -v hz="$hz" -v rss="$rss" 'BEGIN {
        per = (cb - ca) / hz / (tb - ta); printf "%.3f %.1f %.1f\n", per, per * 100, rss / 1024 }')
    # shellcheck disable=SC2059
    printf "$fmt" "$preset" "$s" "$per" "$core" "$rss_mib" "${min:-0}/$window" "$dropped" "$load1" \
      "${renditions:--}${problem:+ / FAIL: $problem}"
    if [ -n "$problem" ]; then
      status=1
      { echo "  $preset/$s: publish summary:"; sed 's/^/    /' "$run/publish.out"
        echo "  server warnings and errors:"
        sed 's/\x1b\[[0-9;]*m//g' "$run/server.log" | grep -E ' (WARN|ERROR) ' | tail -n 10 | sed 's/^/    /'
      } >&2
    fi
  done
done
exit "$status"
