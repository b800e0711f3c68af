#!/usr/bin/env bash
# Regenerates samples/sample.mkv: a 10 s test clip for `whipgate publish` and the tests.
#
#   video: H264 baseline, level 3.1, 640x360, 30 fps, IDR exactly every 30 frames, no B-frames, ~800 kbit/s
#   audio: Opus, 48 kHz stereo, 20 ms frames, ~64 kbit/s
#
# Only FFmpeg's synthetic sources are used (testsrc2 + sine). When drawtext and a font are
# available, the presentation time is burnt in; otherwise the clip is made without it.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here/sample.mkv}"

vf="format=yuv420p"
font=""
if ffmpeg -hide_banner -filters 2>/dev/null | grep -qw drawtext; then
    for f in /usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf \
        "$(fc-match -f '%{file}' monospace 2>/dev/null || true)"; do
        if [ -n "$f" ] && [ -f "$f" ]; then
            font="$f"
            break
        fi
    done
fi
if [ -n "$font" ]; then
    vf="drawtext=fontfile=${font}:text='%{pts\\:hms} f%{n}':x=16:y=16:fontsize=32:fontcolor=white:box=1:boxcolor=black@0.6,${vf}"
fi

ffmpeg -hide_banner -loglevel error -y \
    -f lavfi -i "testsrc2=size=640x360:rate=30:duration=10" \
    -f lavfi -i "sine=frequency=440:beep_factor=4:sample_rate=48000:duration=10" \
    -filter_complex "[0:v]${vf}[v];[1:a]aformat=sample_rates=48000:channel_layouts=stereo[a]" \
    -map "[v]" -map "[a]" \
    -c:v libx264 -profile:v baseline -level 3.1 -preset medium -tune zerolatency \
    -g 30 -keyint_min 30 -sc_threshold 0 -bf 0 \
    -b:v 800k -maxrate 900k -bufsize 800k \
    -c:a libopus -b:a 64k -frame_duration 20 -application audio \
    -t 10 -metadata title="whipgate sample" \
    "$out"

echo "wrote $out ($(stat -c %s "$out") bytes)"
