//! Structured logs: `--log-format json` makes every stderr line one JSON
//! object, with the span it was logged in (a session's, a stream output's)
//! and that span's fields.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::server::Server;
use support::webrtc_publisher::{PublishOpts, publish};

/// The JSON lines of a server log; panics on any line that is not one.
fn json_lines(log: &str) -> Vec<Value> {
    log.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}\nlog:\n{log}"));
            assert!(v.is_object(), "{l}");
            for key in ["timestamp", "level", "target", "fields"] {
                assert!(v.get(key).is_some(), "no `{key}` in {l}");
            }
            v
        })
        .collect()
}

/// The span called `name` a line was logged in: its innermost span
/// (`span`, also set for events given an explicit parent) or one of the
/// spans of the current context (`spans`).
fn span_named<'a>(line: &'a Value, name: &str) -> Option<&'a Value> {
    if line["span"]["name"] == name {
        return Some(&line["span"]);
    }
    line["spans"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == name))
}

/// Lines logged inside a span called `name`.
fn in_span<'a>(lines: &'a [Value], name: &str) -> Vec<&'a Value> {
    lines
        .iter()
        .filter(|l| span_named(l, name).is_some())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_session_and_stream_spans() {
    let server = Server::start_with_args("", &["--log-format", "json"]).expect("server");
    let tmp = tempfile::tempdir().unwrap();
    publish(PublishOpts::sample(
        server.url("/whip/logs"),
        tmp.path(),
        Duration::from_secs(4),
    ))
    .await
    .expect("publish");
    // The end of the publication is logged after the DELETE's answer.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let log = server.log();
    let lines = json_lines(&log);
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"].as_str() == Some("session created")),
        "no `session created` line:\n{log}"
    );

    // The WebRTC session's span: its stream and id on every line in it.
    let session = in_span(&lines, "session");
    assert!(
        !session.is_empty(),
        "nothing logged in a session span:\n{log}"
    );
    for l in &session {
        let span = span_named(l, "session").expect("session span");
        assert_eq!(span["stream"], "logs", "{l}");
        let id = span["session"].as_str().unwrap_or_default();
        assert!(
            id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "{l}"
        );
    }
    // The stream's HLS output logs in its own span, named by stream.
    let hls = in_span(&lines, "hls");
    assert!(!hls.is_empty(), "nothing logged in an hls span:\n{log}");
    for l in &hls {
        assert_eq!(
            span_named(l, "hls").expect("hls span")["stream"],
            "logs",
            "{l}"
        );
    }
}

/// The first log line of `whipgate serve` on free ports, with
/// `WHIPGATE_LOG_FORMAT` set to `format` (or unset).
fn first_line(format: Option<&str>) -> String {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_whipgate"));
    cmd.args(["serve", "--http-listen", "127.0.0.1:0"])
        .args(["--udp-listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("WHIPGATE_LOG", "info")
        .env_remove("WHIPGATE_LOG_FORMAT")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    if let Some(f) = format {
        cmd.env("WHIPGATE_LOG_FORMAT", f);
    }
    let mut child = cmd.spawn().expect("whipgate");
    let mut line = String::new();
    let stderr = child.stderr.take().expect("stderr");
    let read = std::io::BufReader::new(stderr).read_line(&mut line);
    let _ = child.kill();
    let _ = child.wait();
    read.expect("a log line");
    line
}

#[test]
fn text_by_default_json_from_the_environment() {
    let text = first_line(None);
    assert!(serde_json::from_str::<Value>(&text).is_err(), "{text}");
    assert!(
        text.contains("INFO") && text.contains("whipgate listening"),
        "{text}"
    );
    let json: Value = serde_json::from_str(&first_line(Some("json"))).expect("JSON");
    assert_eq!(json["level"], "INFO", "{json}");
    assert!(
        json["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("whipgate listening")),
        "{json}"
    );
    // A format that does not exist is refused, naming the ones that do.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_whipgate"))
        .args(["--log-format", "yaml", "default-config"])
        .output()
        .expect("whipgate");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("text") && err.contains("json"), "{err}");
}
