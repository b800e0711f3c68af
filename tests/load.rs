//! Smoke runs of the load generator: `whipgate publish --sessions 4 --ramp 4` against the real
//! server, each session publishing its own stream (`{n}` in the URL), with each of its two
//! WebRTC senders (`--stack lean`, the default for load runs, and `--stack str0m`). Figures
//! (setup times, packets) are printed by the tool, not asserted.

mod support;

use std::time::Duration;

use support::hls_check::{ended_playlist, total};
use support::server::{Server, sample_mkv};

/// The value of `key=` on the summary line starting with `prefix`.
fn summary_value<'a>(stdout: &'a str, prefix: &str, key: &str) -> Option<&'a str> {
    let line = stdout.lines().find(|l| l.starts_with(prefix))?;
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(key)?.strip_prefix('='))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_lean_sessions_each_become_a_finished_hls_stream() {
    four_sessions_each_become_a_finished_hls_stream("lean").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_str0m_sessions_each_become_a_finished_hls_stream() {
    four_sessions_each_become_a_finished_hls_stream("str0m").await;
}

async fn four_sessions_each_become_a_finished_hls_stream(stack: &str) {
    let server = Server::start("").unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_whipgate"))
        .arg("publish")
        .arg(sample_mkv())
        .arg(server.url("/whip/load{n}"))
        .args(["--sessions", "4", "--ramp", "4", "--duration", "5"])
        .args(["--stack", stack])
        .env("WHIPGATE_LOG", "warn")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(20), out)
        .await
        .expect("publish finished in time")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("--stack {stack}:\n{stdout}");
    assert!(
        out.status.success(),
        "whipgate publish: {}\n{stdout}\n{stderr}",
        out.status
    );
    assert_eq!(
        summary_value(&stdout, "sessions:", "up"),
        Some("4"),
        "{stdout}"
    );
    assert_eq!(
        summary_value(&stdout, "sessions:", "failed"),
        Some("0"),
        "{stdout}"
    );
    assert_eq!(
        summary_value(&stdout, "POST->201", "n"),
        Some("4"),
        "{stdout}"
    );
    assert!(stdout.contains("errors: none"), "{stdout}");

    for n in 0..4 {
        let stream = format!("load{n}");
        assert!(
            server.hls_dir(&stream).join("index.m3u8").exists(),
            "{stream}"
        );
        let playlist = ended_playlist(&server, &stream).await;
        let listed = total(&playlist);
        assert!(
            (4.0..=6.1).contains(&listed),
            "{stream}: {listed} s listed, expected ~5 s"
        );
    }
    assert!(!server.log().contains("panicked"));
}
