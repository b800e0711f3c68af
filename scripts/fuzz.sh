#!/usr/bin/env bash
# Runs the cargo-fuzz targets of fuzz/ for a bounded time each (not CI).
#
#   scripts/fuzz.sh                      every target, FUZZ_SECONDS (60) each
#   scripts/fuzz.sh ts_mux flv_tag       only these
#   FUZZ_SECONDS=600 scripts/fuzz.sh     longer
#
# Needs the nightly toolchain (`rustup toolchain install nightly`); installs
# cargo-fuzz when missing. The corpus grows in fuzz/corpus/<target>/ (seeded
# from fuzz/seeds/<target>/ and tests/fuzz_regressions/<target>/, which are
# only read). A crashing input is copied to tests/fuzz_regressions/<target>/,
# where `cargo test --test fuzz_regressions` replays it from then on: fix the
# bug, keep the file, commit both. Exit status 1 when a target crashed.
#
# Other knobs: FUZZ_TIMEOUT (seconds one input may take, default 10),
# FUZZ_MAX_LEN (largest input in bytes, default 8192), FUZZ_ARGS (more
# libFuzzer flags, e.g. "-rss_limit_mb=4096").
set -uo pipefail

cd "$(dirname "$0")/.."
seconds=${FUZZ_SECONDS:-60}
timeout=${FUZZ_TIMEOUT:-10}
max_len=${FUZZ_MAX_LEN:-8192}

if ! rustup toolchain list | grep -q '^nightly'; then
    echo "fuzz.sh: the nightly toolchain is needed: rustup toolchain install nightly" >&2
    exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked || exit 2
fi

all=$(cargo +nightly fuzz list --fuzz-dir fuzz) || exit 2
if [ $# -gt 0 ]; then
    targets=("$@")
    for t in "${targets[@]}"; do
        if ! grep -qx -- "$t" <<<"$all"; then
            echo "fuzz.sh: no target $t (targets: $(echo $all))" >&2
            exit 2
        fi
    done
else
    mapfile -t targets <<<"$all"
fi

# One build of every target (release, debug assertions, AddressSanitizer),
# then the binaries run directly: no rebuild between targets.
echo "== building the fuzz targets (nightly, sanitizer: address)"
cargo +nightly fuzz build --fuzz-dir fuzz || exit 2
triple=$(rustc +nightly -vV | sed -n 's/^host: //p')
bin_dir=fuzz/target/$triple/release

crashed=()
summary=()
for t in "${targets[@]}"; do
    corpus=fuzz/corpus/$t
    artifacts=fuzz/artifacts/$t
    log=fuzz/artifacts/$t.log
    mkdir -p "$corpus" "$artifacts"
    inputs=("$corpus")
    for extra in "fuzz/seeds/$t" "tests/fuzz_regressions/$t"; do
        [ -d "$extra" ] && inputs+=("$extra")
    done
    before=$(find "$artifacts" -type f | sort)
    echo "== $t: ${seconds}s (log: $log)"
    # What `cargo fuzz run` would do, without its rebuild.
    ASAN_OPTIONS=${ASAN_OPTIONS:-detect_odr_violation=0} "$bin_dir/$t" \
        -artifact_prefix="$artifacts/" -max_total_time="$seconds" \
        -timeout="$timeout" -max_len="$max_len" -print_final_stats=1 \
        ${FUZZ_ARGS:-} "${inputs[@]}" >"$log" 2>&1
    status=$?
    # libFuzzer's last status line: "#RUNS ... cov: N ft: N corp: N/size ...".
    last=$(grep -E '^#[0-9]+' "$log" | tail -n 1)
    runs=$(grep -E '^stat::number_of_executed_units:' "$log" | awk '{s+=$2} END {print s+0}')
    cov=$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$last")
    ft=$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$last")
    corp=$(sed -nE 's/.* corp: ([0-9]+).*/\1/p' <<<"$last")
    new=$(comm -13 <(echo "$before") <(find "$artifacts" -type f | sort) | grep -v '/slow-unit-' || true)
    result="ok"
    if [ -n "$new" ]; then
        result="CRASH"
        crashed+=("$t")
        mkdir -p "tests/fuzz_regressions/$t"
        for f in $new; do
            dest=tests/fuzz_regressions/$t/$(basename "$f")
            cp "$f" "$dest"
            echo "fuzz.sh: $t crashed; input kept as $dest" >&2
            echo "          reproduce: cargo +nightly fuzz run --fuzz-dir fuzz $t $dest" >&2
            echo "          replayed by: cargo test --test fuzz_regressions" >&2
        done
        grep -A 1 -m 1 'panicked at' "$log" >&2
        grep -m 1 'SUMMARY:' "$log" >&2
    elif [ $status -ne 0 ]; then
        result="FAILED (status $status, see $log)"
        crashed+=("$t")
    fi
    summary+=("$(printf '%-18s %-6s runs %-10s cov %-6s ft %-6s corpus %s' \
        "$t" "$result" "${runs:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}")")
done

echo
echo "== summary (${seconds}s per target)"
printf '%s\n' "${summary[@]}"
if [ ${#crashed[@]} -gt 0 ]; then
    echo "crashed or failed: ${crashed[*]} (inputs in tests/fuzz_regressions/, logs in fuzz/artifacts/)" >&2
    exit 1
fi
