//! Metrics, health and readiness of the real server during a real WebRTC
//! publication (webrtc-rs).

mod support;

use std::time::Duration;

use support::server::Server;
use support::webrtc_publisher::{PublishOpts, publish};

/// Sum of the samples of `name` whose labels contain every one of `labels`
/// (`key="value"`).
fn value(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, v) = l.rsplit_once(' ')?;
            let (n, rest) = match series.split_once('{') {
                Some((n, rest)) => (n, rest),
                None => (series, ""),
            };
            (n == name && labels.iter().all(|want| rest.contains(want)))
                .then(|| v.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_during_a_publication_and_health_answers() {
    let server = Server::start("").unwrap();
    let http = reqwest::Client::new();

    let healthz = http.get(server.url("/healthz")).send().await.unwrap();
    assert_eq!(healthz.status(), 200);
    assert_eq!(healthz.text().await.unwrap(), "ok");
    let readyz = http.get(server.url("/readyz")).send().await.unwrap();
    assert_eq!(readyz.status(), 200);

    let tmp = tempfile::tempdir().unwrap();
    let report = publish(PublishOpts::sample(
        server.url("/whip/m"),
        tmp.path(),
        Duration::from_secs(4),
    ))
    .await
    .unwrap();
    assert!(report.video_frames_sent > 0);

    // The last segment is written when the playlist ends, just after DELETE.
    let mut text = String::new();
    for _ in 0..50 {
        let resp = http.get(server.url("/metrics")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let ct = resp.headers()[reqwest::header::CONTENT_TYPE]
            .to_str()
            .unwrap();
        assert!(ct.starts_with("text/plain"), "{ct}");
        text = resp.text().await.unwrap();
        if value(&text, "whipgate_hls_segments_total", &[]) >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("{text}");

    assert!(value(&text, "whipgate_sessions_created_total", &[]) >= 1.0);
    assert!(value(&text, "whipgate_bytes_in_total", &[]) > 100_000.0);
    assert!(value(&text, "whipgate_packets_in_total", &[]) > 100.0);
    assert!(
        value(
            &text,
            "whipgate_frames_published_total",
            &[r#"stream="m""#, r#"codec="h264""#]
        ) > 0.0
    );
    assert!(
        value(
            &text,
            "whipgate_frames_published_total",
            &[r#"stream="m""#, r#"codec="aac""#]
        ) > 0.0
    );
    assert!(value(&text, "whipgate_hls_segments_total", &[]) >= 1.0);
    // The publisher starts with a keyframe: no request needed, but counted.
    assert!(text.contains("whipgate_keyframe_requests_total "));
    // Receive statistics (every 2 s) and the transcoders' queue wait.
    assert!(text.contains("whipgate_nacks_sent_total "), "{text}");
    // Frames per output (hub reader).
    assert!(
        value(
            &text,
            "whipgate_frames_delivered_total",
            &["stream=\"m\"", "reader=\"hls\""]
        ) > 100.0,
        "{text}"
    );
    assert!(
        text.contains("whipgate_packet_loss_ratio{stream=\"m\"}"),
        "{text}"
    );
    assert!(text.contains("whipgate_transcode_lag_seconds{"), "{text}");
    let loss = value(&text, "whipgate_packet_loss_ratio", &["stream=\"m\""]);
    assert!((0.0..0.05).contains(&loss), "loss {loss} on loopback");
    let lag = value(
        &text,
        "whipgate_transcode_lag_seconds",
        &["stream=\"m\"", "transcoder=\"aac\""],
    );
    assert!((0.0..1.0).contains(&lag), "AAC transcoder lag {lag} s");
    assert!(
        value(
            &text,
            "whipgate_http_requests_total",
            &[r#"route="/whip/{stream}""#, r#"status="201""#]
        ) >= 1.0
    );
    assert!(
        value(
            &text,
            "whipgate_http_requests_total",
            &[r#"route="/healthz""#, r#"status="200""#]
        ) >= 1.0
    );
    assert!(value(&text, "whipgate_process_resident_memory_bytes", &[]) > 0.0);
    assert!(text.contains("whipgate_process_cpu_seconds_total "));
    assert!(text.contains("whipgate_sessions_active "));
    assert!(text.contains("whipgate_streams_live "));
    // No raw URI (session ids) in labels.
    let session_id = report.location.rsplit('/').next().unwrap();
    assert!(!text.contains(session_id), "{session_id}");

    let readyz = http.get(server.url("/readyz")).send().await.unwrap();
    assert_eq!(readyz.status(), 200);
    assert!(!server.log().contains("panicked"));
}
