//! The stream API (`/api/v1/streams/...`) against the real binary: streams
//! created through it survive restarts, bad bodies get 400/422 problems
//! naming what is wrong, PUT/GET/DELETE/kick round trip with a real
//! publication, the admin token when configured, the OpenAPI document.

mod support;

use std::time::Duration;

use reqwest::{Client, Method, StatusCode, header};
use serde_json::{Value, json};
use support::nginx::Nginx;
use support::server::Server;
use support::webrtc_publisher::{PublishOpts, publish};
use support::whip_http::{PROBLEM_JSON, client, detail, expect_problem, header_str};

const API_TOKEN: &str = "api-token-0123456789";
const STREAM_TOKEN: &str = "cam-token-secret-1";

async fn send(
    client: &Client,
    server: &Server,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> reqwest::Response {
    let mut req = client.request(method, server.url(path));
    if let Some(b) = body {
        req = req.json(&b);
    }
    req.send().await.expect("request")
}

async fn get(client: &Client, server: &Server, path: &str) -> reqwest::Response {
    send(client, server, Method::GET, path, None).await
}

async fn put(client: &Client, server: &Server, path: &str, body: Value) -> reqwest::Response {
    send(client, server, Method::PUT, path, Some(body)).await
}

async fn delete(client: &Client, server: &Server, path: &str) -> reqwest::Response {
    send(client, server, Method::DELETE, path, None).await
}

async fn get_json(client: &Client, server: &Server, path: &str) -> Value {
    let resp = send(client, server, Method::GET, path, None).await;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    assert_eq!(status, StatusCode::OK, "GET {path}: {text}");
    serde_json::from_str(&text).expect("JSON")
}

/// `GET` of a stream, polled until `f` accepts it.
async fn wait_stream(
    client: &Client,
    server: &Server,
    stream: &str,
    what: &str,
    f: impl Fn(&Value) -> bool,
) -> Value {
    let path = format!("/api/v1/streams/{stream}");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let v = get_json(client, server, &path).await;
        if f(&v) {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}: {v:#}\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn publish_opts(server: &Server, stream: &str, secs: u64, dir: &std::path::Path) -> PublishOpts {
    let url = server.url(&format!("/whip/{stream}"));
    PublishOpts {
        token: Some(STREAM_TOKEN.to_owned()),
        delete_at_end: false,
        ..PublishOpts::sample(url, dir, Duration::from_secs(secs))
    }
}

fn assert_no_secret(v: &impl ToString, secrets: &[&str]) {
    let text = v.to_string();
    for s in secrets {
        assert!(!text.contains(s), "secret {s:?} shown: {text}");
    }
}

// A stream with a push target made through the API survives a restart, and
// its target then restreams a real publication to nginx-rtmp.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_streams_survive_restarts_and_push() {
    let nginx = Nginx::start(false).expect("nginx");
    let mut server = Server::start("").expect("server");
    let client = client();
    let push_url = nginx.rtmp_url("api-secret-key");
    let settings = json!({
        "preset": "passthrough",
        "tokens": [STREAM_TOKEN],
        "push": [push_url],
        "takeover": "never",
    });
    let resp = put(&client, &server, "/api/v1/streams/cam", settings.clone()).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(
        header_str(resp.headers(), header::LOCATION),
        "/api/v1/streams/cam"
    );
    let created: Value = resp.json().await.unwrap();
    assert_eq!(created["source"], "api", "{created}");
    assert_eq!(created["settings"]["tokens"], json!(["********"]));
    assert_eq!(created["settings"]["takeover"], "never");
    assert_no_secret(&created, &[STREAM_TOKEN, "api-secret-key"]);
    // The same again replaces: 200.
    let resp = put(&client, &server, "/api/v1/streams/cam", settings).await;
    assert_eq!(resp.status(), StatusCode::OK);

    // On disk before the answer, owner-only.
    let state = server.dir.path().join("data/streams.json");
    let on_disk: Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    assert_eq!(on_disk["streams"]["cam"]["push"][0], push_url.as_str());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&state).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{mode:o}");
    }

    server.restart().expect("restart");

    let v = get_json(&client, &server, "/api/v1/streams/cam").await;
    assert_eq!(v["source"], "api", "{v}");
    assert_eq!(v["running"], false, "{v}");
    assert_eq!(v["settings"]["tokens"], json!(["********"]), "{v}");
    let masked = v["settings"]["push"][0].as_str().unwrap_or_default();
    assert!(masked.starts_with("rtmp://127.0.0.1:"), "{v}");
    assert_no_secret(&v, &[STREAM_TOKEN, "api-secret-key"]);
    let list = get_json(&client, &server, "/api/v1/streams").await;
    assert_eq!(list["streams"][0]["name"], "cam", "{list}");

    // The token defined through the API is required to publish.
    let tmp = tempfile::tempdir().unwrap();
    let mut opts = publish_opts(&server, "cam", 6, tmp.path());
    opts.token = None;
    let refused = publish(opts.clone()).await;
    assert!(refused.is_err(), "published without the stream's token");
    opts.token = Some(STREAM_TOKEN.to_owned());
    opts.delete_at_end = true;
    let publisher = tokio::spawn(publish(opts));

    // The target pushes; the publisher's figures show.
    let v = wait_stream(&client, &server, "cam", "the push to publish", |v| {
        v["push"][0]["state"] == "publishing"
            && v["publisher"]["video"]["frame_rate"].as_f64() > Some(0.0)
    })
    .await;
    let p = &v["publisher"];
    assert_eq!(p["ip"], "127.0.0.1", "{v}");
    assert_eq!(p["video"]["codec"], "h264", "{v}");
    assert!(p["video"]["width"].as_u64() > Some(0), "{v}");
    assert!(p["video"]["bitrate"].as_u64() > Some(10_000), "{v}");
    assert_eq!(p["audio"]["codec"], "opus", "{v}");
    assert_eq!(p["audio"]["sample_rate"], 48000, "{v}");
    assert_eq!(v["live"], true);
    assert_no_secret(&v, &[STREAM_TOKEN, "api-secret-key"]);
    publisher.await.unwrap().expect("publication");

    let log = server.log();
    assert!(!log.contains("panicked"), "{log}");
    assert_no_secret(&log, &[STREAM_TOKEN, "api-secret-key"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bodies_get_400_or_422_naming_the_problem() {
    let server = Server::start("").expect("server");
    let client = client();
    let put = |body: &'static str, content_type: Option<&'static str>| {
        let mut req = client
            .put(server.url("/api/v1/streams/bad"))
            .body(body.to_owned());
        if let Some(t) = content_type {
            req = req.header(header::CONTENT_TYPE, t);
        }
        req.send()
    };
    let json = Some("application/json");
    for (body, status, needle) in [
        ("{", StatusCode::BAD_REQUEST, "EOF"),
        ("not json", StatusCode::BAD_REQUEST, "expected"),
        (r#"{"nope": 1}"#, StatusCode::BAD_REQUEST, "nope"),
        (r#"{"enabled": "yes"}"#, StatusCode::BAD_REQUEST, "enabled"),
        (
            r#"{"push": "rtmp://h/a/k"}"#,
            StatusCode::BAD_REQUEST,
            "push",
        ),
        (
            r#"{"hls": {"format": "dash"}}"#,
            StatusCode::BAD_REQUEST,
            "dash",
        ),
        ("[]", StatusCode::BAD_REQUEST, "object"),
        (
            r#"{"preset": "no-such-preset"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "`preset`",
        ),
        (
            r#"{"tokens": ["short"]}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "`tokens`",
        ),
        (
            r#"{"push": ["http://example.com/a/b"]}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "`push[0]`",
        ),
        (
            r#"{"tokens": ["********"]}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "masked",
        ),
    ] {
        let resp = put(body, json).await.expect("PUT");
        let (_, problem) = expect_problem(resp, status, body).await;
        assert!(detail(&problem).contains(needle), "{body}: {problem}");
    }
    let resp = put("{}", None).await.expect("PUT");
    expect_problem(resp, StatusCode::UNSUPPORTED_MEDIA_TYPE, "no type").await;
    let resp = client
        .put(server.url("/api/v1/streams/.hidden"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    let (_, problem) = expect_problem(resp, StatusCode::BAD_REQUEST, ".hidden").await;
    assert!(detail(&problem).contains("stream name"), "{problem}");

    // Nothing was stored.
    let resp = get(&client, &server, "/api/v1/streams/bad").await;
    expect_problem(resp, StatusCode::NOT_FOUND, "refused stream").await;
    assert!(!server.dir.path().join("data/streams.json").exists());
    let list = get_json(&client, &server, "/api/v1/streams").await;
    assert_eq!(list, json!({"streams": []}));
}

// PUT, GET, DELETE and kick around real publications: a change made while
// live applies to the next publication, push targets change at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_get_delete_kick_round_trip() {
    let config = "[streams.conf]\npreset = \"audio-only\"\n";
    let mut server = Server::start(config).expect("server");
    let client = client();
    let tmp = tempfile::tempdir().unwrap();

    // The config file's stream is listed, not running.
    let list = get_json(&client, &server, "/api/v1/streams").await;
    assert_eq!(list["streams"][0]["name"], "conf", "{list}");
    assert_eq!(list["streams"][0]["source"], "config", "{list}");
    let resp = get(&client, &server, "/api/v1/streams/none").await;
    expect_problem(resp, StatusCode::NOT_FOUND, "unknown stream").await;

    // The API overrides it; DELETE gives the config file's settings back.
    let resp = put(
        &client,
        &server,
        "/api/v1/streams/conf",
        json!({"preset": "copy-all"}),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let v = get_json(&client, &server, "/api/v1/streams/conf").await;
    assert_eq!(
        (v["source"].as_str(), v["preset"].as_str()),
        (Some("api"), Some("copy-all"))
    );
    let resp = delete(&client, &server, "/api/v1/streams/conf").await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let v = get_json(&client, &server, "/api/v1/streams/conf").await;
    assert_eq!(
        (v["source"].as_str(), v["preset"].as_str()),
        (Some("config"), Some("audio-only"))
    );
    let resp = delete(&client, &server, "/api/v1/streams/conf").await;
    let (_, p) = expect_problem(resp, StatusCode::NOT_FOUND, "second DELETE").await;
    assert!(detail(&p).contains("API"), "{p}");

    // A stream made through the API, published.
    let resp = put(
        &client,
        &server,
        "/api/v1/streams/live",
        json!({"tokens": [STREAM_TOKEN]}),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let resp = send(
        &client,
        &server,
        Method::POST,
        "/api/v1/streams/live/kick",
        None,
    )
    .await;
    let (_, p) = expect_problem(resp, StatusCode::NOT_FOUND, "kick, nobody").await;
    assert!(detail(&p).contains("no publisher"), "{p}");

    let publisher = tokio::spawn(publish(publish_opts(&server, "live", 30, tmp.path())));
    let v = wait_stream(&client, &server, "live", "the publication", |v| {
        v["live"] == true && v["publisher"]["video"]["width"].as_u64() > Some(0)
    })
    .await;
    assert_eq!(v["preset"], "passthrough");
    assert_eq!(v["settings_pending"], false);

    // Changed while live: push targets at once, the preset next time.
    let unreachable = format!(
        "rtmp://127.0.0.1:{}/live/a-push-key-0123456789",
        support::server::free_tcp_port()
    );
    let resp = put(
        &client,
        &server,
        "/api/v1/streams/live",
        json!({"tokens": [STREAM_TOKEN], "preset": "copy-all", "push": [unreachable]}),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["preset"], "passthrough", "{v}");
    assert_eq!(v["settings"]["preset"], "copy-all", "{v}");
    assert_eq!(v["settings_pending"], true, "{v}");
    assert_eq!(v["push"].as_array().map(Vec::len), Some(1), "{v}");
    assert_no_secret(&v, &["a-push-key-0123456789", STREAM_TOKEN]);

    // Kick: the publication ends.
    let resp = send(
        &client,
        &server,
        Method::POST,
        "/api/v1/streams/live/kick",
        None,
    )
    .await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    wait_stream(
        &client,
        &server,
        "live",
        "the end of the publication",
        |v| v["live"] == false && v["session"].is_null(),
    )
    .await;
    // (The test publisher does not watch its connection: stop it.)
    publisher.abort();

    // The next publication runs with the new preset.
    let publisher = tokio::spawn(publish(publish_opts(&server, "live", 30, tmp.path())));
    let v = wait_stream(&client, &server, "live", "the second publication", |v| {
        v["live"] == true
    })
    .await;
    assert_eq!(v["preset"], "copy-all", "{v}");
    assert_eq!(v["settings_pending"], false, "{v}");
    assert_eq!(v["push"].as_array().map(Vec::len), Some(1), "{v}");

    // DELETE forgets it and ends the publication.
    let resp = delete(&client, &server, "/api/v1/streams/live").await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let v = wait_stream(&client, &server, "live", "the end after DELETE", |v| {
        v["live"] == false
    })
    .await;
    assert_eq!(v["source"], "defaults", "{v}");
    assert_eq!(v["push"], json!([]), "{v}");
    publisher.abort();

    // Gone for good: after a restart nobody knows it.
    server.restart().expect("restart");
    let resp = get(&client, &server, "/api/v1/streams/live").await;
    expect_problem(resp, StatusCode::NOT_FOUND, "deleted stream after restart").await;
    let log = server.log();
    assert!(!log.contains("panicked"), "{log}");
    assert_no_secret(&log, &["a-push-key-0123456789", STREAM_TOKEN]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_is_required_when_configured() {
    let config = format!("[server]\napi_token = \"{API_TOKEN}\"\n");
    let server = Server::start(&config).expect("server");
    let client = client();
    let routes = [
        (Method::GET, "/api/v1/streams"),
        (Method::GET, "/api/v1/streams/x"),
        (Method::PUT, "/api/v1/streams/x"),
        (Method::DELETE, "/api/v1/streams/x"),
        (Method::POST, "/api/v1/streams/x/kick"),
        (Method::GET, "/api/v1/streams/x/push"),
        (Method::POST, "/api/v1/streams/x/push"),
        (Method::DELETE, "/api/v1/streams/x/push/1"),
        (Method::GET, "/api/v1/openapi.json"),
    ];
    for (method, path) in &routes {
        for token in [None, Some("api-token-wrong-000000"), Some("")] {
            let mut req = client
                .request(method.clone(), server.url(path))
                .json(&json!({}));
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            let resp = req.send().await.unwrap();
            let what = format!("{method} {path} with {token:?}");
            let (h, _) = expect_problem(resp, StatusCode::UNAUTHORIZED, &what).await;
            assert!(
                header_str(&h, header::WWW_AUTHENTICATE).starts_with("Bearer"),
                "{what}"
            );
        }
    }
    // Nothing was changed by those.
    assert!(!server.dir.path().join("data/streams.json").exists());
    let resp = client
        .put(server.url("/api/v1/streams/x"))
        .bearer_auth(API_TOKEN)
        .json(&json!({"preset": "copy-all"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let resp = client
        .get(server.url("/api/v1/streams"))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["streams"][0]["name"], "x", "{v}");
    assert!(!server.log().contains(API_TOKEN), "API token logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_is_served() {
    let server = Server::start("").expect("server");
    let client = client();
    let resp = get(&client, &server, "/api/v1/openapi.json").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        header_str(resp.headers(), header::CONTENT_TYPE),
        "application/json"
    );
    let doc: Value = resp.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    for path in [
        "/api/v1/streams",
        "/api/v1/streams/{stream}",
        "/api/v1/streams/{stream}/kick",
    ] {
        assert!(doc["paths"][path].is_object(), "{path}");
    }
    // A method the API does not have is a 405 problem.
    let resp = send(&client, &server, Method::PATCH, "/api/v1/streams/x", None).await;
    let got = resp.status();
    assert_eq!(got, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        header_str(resp.headers(), header::CONTENT_TYPE),
        PROBLEM_JSON
    );
}

// Without an API token the API trusts loopback clients, and any web page in
// a browser on the server's machine is one: pages of other origins are
// refused, the console's own (same origin) are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_origins_are_refused_without_a_token() {
    let server = Server::start("").expect("server");
    let client = client();
    let own = format!("http://127.0.0.1:{}", server.http_port);
    for (origin, allowed) in [
        ("http://evil.example", false),
        ("null", false),
        ("http://127.0.0.1:1", false),
        (own.as_str(), true),
    ] {
        let resp = client
            .post(server.url("/api/v1/streams/x/kick"))
            .header(header::ORIGIN, origin)
            .send()
            .await
            .unwrap();
        let status = if allowed {
            StatusCode::NOT_FOUND
        } else {
            StatusCode::FORBIDDEN
        };
        let (_, p) = expect_problem(resp, status, origin).await;
        if !allowed {
            assert!(detail(&p).contains("cross-origin"), "{p}");
        }
    }
    // With a token, other origins are fine (the token is the proof).
    let config = format!("[server]\napi_token = \"{API_TOKEN}\"\n");
    let server = Server::start(&config).expect("server");
    let resp = client
        .get(server.url("/api/v1/streams"))
        .header(header::ORIGIN, "https://dashboard.example")
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}
