#!/usr/bin/env bash
# The whole test suite, as CI runs it: system packages, formatting, lints,
# unit tests and the end-to-end tests (real WebRTC peers, real FFmpeg,
# ffprobe-validated HLS).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo test --all-targets -- --test-threads=2
