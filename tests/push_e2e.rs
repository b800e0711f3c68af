//! RTMP push through the whole server: a WebRTC publication (webrtc-rs)
//! restreamed to a real nginx-rtmp, targets from the config and from the
//! HTTP API while the stream is live, checked in nginx's recordings.

mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::nginx::{Nginx, check_recording, check_recording_between};
use support::server::{Server, wait_for};
use support::webrtc_publisher::{PublishOpts, publish};

async fn get_json(client: &reqwest::Client, url: &str) -> Value {
    let resp = client.get(url).send().await.unwrap();
    assert_eq!(resp.status(), 200, "GET {url}");
    resp.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_and_api_targets_restream_a_webrtc_publication() {
    let nginx = Nginx::start(false).unwrap();
    // A config target for every stream, with {stream} in the key.
    let config = format!(
        "[stream_defaults]\npush = [\"{}\"]\n",
        nginx.rtmp_url("cfg-{stream}")
    );
    let server = Server::start(&config).unwrap();
    let client = reqwest::Client::new();
    let tmp = tempfile::tempdir().unwrap();
    let opts = PublishOpts::sample(server.url("/whip/show"), tmp.path(), Duration::from_secs(9));
    let started = Instant::now();
    let publisher = tokio::spawn(publish(opts));

    // The config target publishes, with its key masked in the API.
    let list_url = server.url("/api/v1/streams/show/push");
    let pushes = wait_for(
        "the config target to publish",
        Duration::from_secs(10),
        || {
            let body = std::process::Command::new("curl")
                .args(["-s", &list_url])
                .output()
                .ok()?;
            let v: Value = serde_json::from_slice(&body.stdout).ok()?;
            let publishing = v["push"][0]["state"] == "publishing";
            publishing.then_some(v)
        },
    )
    .await
    .unwrap();
    let listed = pushes.to_string();
    assert!(!listed.contains("cfg-show"), "key masked: {listed}");

    // A second target added through the API while live.
    let resp = client
        .post(&list_url)
        .json(&serde_json::json!({ "url": nginx.rtmp_url("api-key") }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let added: Value = resp.json().await.unwrap();
    let id = added["id"].as_u64().unwrap();
    assert!(!added.to_string().contains("api-key"));
    let added_at = started.elapsed().as_secs_f64();

    // Bad requests get 400 problems, not crashes.
    for body in [r#"{"url": "http://x/y"}"#, r#"{"nope": 1}"#, "not json"] {
        let resp = client
            .post(&list_url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{body}");
    }

    // Remove the API target after a while: the config target goes on.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let resp = client
        .delete(server.url(&format!("/api/v1/streams/show/push/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let removed_at = started.elapsed().as_secs_f64();
    let v = get_json(&client, &list_url).await;
    assert_eq!(v["push"].as_array().unwrap().len(), 1, "{v}");

    publisher.await.unwrap().unwrap();
    let stream = get_json(&client, &server.url("/api/v1/streams/show")).await;
    assert_eq!(stream["name"], "show");

    // The config target carried the whole publication, the API target the
    // part between add and remove; both decode cleanly.
    check_recording(&nginx.recording("cfg-show"), 9.0)
        .await
        .unwrap();
    // It starts on the keyframe before it was added (at most a GOP, 1 s,
    // earlier) and stops when removed.
    let live = removed_at - added_at;
    check_recording_between(&nginx.recording("api-key"), live - 1.0, live + 1.5)
        .await
        .unwrap();
    let log = server.log();
    assert!(!log.contains("panicked"));
    assert!(
        !log.contains("cfg-show") && !log.contains("api-key"),
        "a stream key leaked into the log"
    );
}
