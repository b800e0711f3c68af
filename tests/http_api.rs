mod support;

// The WHIP HTTP interface, status code by status code, against the real
// server binary: every answer the README promises, with its headers, and
// every error as `application/problem+json`.

use std::time::Duration;

use reqwest::header;
use reqwest::{Client, Method, StatusCode};
use support::server::Server;
use support::whip_http::{
    PROBLEM_JSON, client, detail, expect_problem, genuine_offer, header_str, post_sdp,
};

const TOKEN: &str = "a-long-secret-1";

/// The server still answers and never panicked.
async fn assert_alive(client: &Client, server: &Server) {
    let resp = client
        .request(Method::OPTIONS, server.url("/whip/test"))
        .send()
        .await
        .expect("the server still answers");
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let log = server.log();
    assert!(!log.contains("panicked"), "the server panicked:\n{log}");
}

/// In the config of `unknown_things_are_404`: must never be served.
const CONFIG_MARKER: &str = "config-marker-5f0e2a";

/// A GET with the path exactly as given (no dot-segment normalisation):
/// the status and the whole response.
async fn raw_get(server: &Server, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", server.http_port))
        .await
        .expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.expect("write");
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut response))
        .await
        .expect("a response within 10 s")
        .expect("read");
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{path}: not an HTTP response: {response:?}"));
    (status, response)
}

/// `m=` sections of an SDP: the session part first, then one string per
/// media section, each with its line endings.
fn split_sections(sdp: &str) -> Vec<String> {
    let mut sections = vec![String::new()];
    for line in sdp.split_inclusive('\n') {
        if line.starts_with("m=") {
            sections.push(String::new());
        }
        sections.last_mut().expect("a section").push_str(line);
    }
    sections
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_answers_204_with_cors() {
    let server = Server::start("").expect("server");
    let client = client();
    let resp = client
        .request(Method::OPTIONS, server.url("/whip/test"))
        .header(header::ORIGIN, "https://example.com")
        .header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST")
        .send()
        .await
        .expect("OPTIONS");
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let h = resp.headers();
    assert_eq!(header_str(h, "accept-post"), "application/sdp");
    assert_eq!(header_str(h, header::ACCESS_CONTROL_ALLOW_ORIGIN), "*");
    let expose: Vec<String> = header_str(h, header::ACCESS_CONTROL_EXPOSE_HEADERS)
        .split(',')
        .map(|s| s.trim().to_ascii_lowercase())
        .collect();
    for name in ["location", "etag", "link"] {
        assert!(
            expose.iter().any(|e| e == name),
            "Access-Control-Expose-Headers lacks {name}: {expose:?}"
        );
    }
    let methods = header_str(h, header::ACCESS_CONTROL_ALLOW_METHODS);
    assert!(methods.contains("POST"), "{methods}");
    // ICE servers are given on the 201 only (nothing configured here anyway).
    assert!(h.get(header::LINK).is_none(), "Link on OPTIONS: {h:?}");
    assert!(resp.text().await.expect("body").is_empty());
    assert_alive(&client, &server).await;
}

const ICE_CONFIG: &str = r#"
[[webrtc.ice_servers]]
urls = ["stun:stun.example.org:3478"]

[[webrtc.ice_servers]]
urls = ["turn:turn.example.org:3478?transport=udp"]
username = "turn-user"
credential = "turn-pass"

[streams.solo]
takeover = "never"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_201_then_409_then_delete_200_and_404() {
    let server = Server::start(ICE_CONFIG).expect("server");
    let client = client();
    let offer = genuine_offer(&server, "solo").await.expect("offer");

    // 201 with the answer and every WHIP header.
    let resp = post_sdp(&client, &server, "solo", None, offer.clone())
        .await
        .expect("POST");
    let status = resp.status();
    let h = resp.headers().clone();
    let answer = resp.text().await.expect("answer");
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    assert_eq!(header_str(&h, header::CONTENT_TYPE), "application/sdp");
    assert!(answer.starts_with("v=0"), "{answer}");
    assert!(answer.contains("a=ice-lite"), "{answer}");
    let port = format!(" 127.0.0.1 {} ", server.udp_port);
    assert!(
        answer
            .lines()
            .any(|l| l.starts_with("a=candidate:") && l.contains(&port)),
        "no candidate on 127.0.0.1:{}:\n{answer}",
        server.udp_port
    );

    let location = header_str(&h, header::LOCATION).to_owned();
    let session = location
        .strip_prefix("/whip/solo/")
        .unwrap_or_else(|| panic!("Location {location:?}"));
    assert!(
        session.len() == 32 && session.bytes().all(|b| b.is_ascii_hexdigit()),
        "Location {location:?}: the session id is not 32 hex digits"
    );

    let etag = header_str(&h, header::ETAG);
    assert!(
        etag.len() > 2 && etag.starts_with('"') && etag.ends_with('"'),
        "ETag {etag:?} is not a quoted strong tag"
    );
    assert!(!etag[1..etag.len() - 1].contains('"'), "ETag {etag:?}");

    let links: Vec<&str> = h
        .get_all(header::LINK)
        .iter()
        .map(|v| v.to_str().expect("ASCII Link"))
        .collect();
    assert_eq!(links.len(), 2, "{links:?}");
    let stun = links
        .iter()
        .find(|l| l.starts_with("<stun:stun.example.org:3478>"))
        .unwrap_or_else(|| panic!("no STUN Link: {links:?}"));
    assert!(stun.contains(r#"rel="ice-server""#), "{stun}");
    assert!(!stun.contains("username"), "{stun}");
    let turn = links
        .iter()
        .find(|l| l.starts_with("<turn:turn.example.org:3478?transport=udp>"))
        .unwrap_or_else(|| panic!("no TURN Link: {links:?}"));
    for part in [
        r#"rel="ice-server""#,
        r#"username="turn-user""#,
        r#"credential="turn-pass""#,
        r#"credential-type="password""#,
    ] {
        assert!(turn.contains(part), "TURN Link lacks {part}: {turn}");
    }

    // 409 while the session exists (takeover = "never").
    let second = genuine_offer(&server, "solo").await.expect("offer");
    let resp = post_sdp(&client, &server, "solo", None, second)
        .await
        .expect("POST");
    let (_, body) = expect_problem(resp, StatusCode::CONFLICT, "second publisher").await;
    assert!(detail(&body).contains("solo"), "{body}");

    // 200 on DELETE, then 404: the session is gone.
    let resp = client
        .delete(server.url(&location))
        .send()
        .await
        .expect("DELETE");
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = client
        .delete(server.url(&location))
        .send()
        .await
        .expect("DELETE");
    expect_problem(resp, StatusCode::NOT_FOUND, "second DELETE").await;

    // The stream is free again.
    let resp = post_sdp(&client, &server, "solo", None, offer)
        .await
        .expect("POST");
    assert_eq!(resp.status(), StatusCode::CREATED);
    let again = header_str(resp.headers(), header::LOCATION).to_owned();
    assert_ne!(again, location, "a session id was reused");
    let resp = client
        .delete(server.url(&again))
        .send()
        .await
        .expect("DELETE");
    assert_eq!(resp.status(), StatusCode::OK);

    assert_alive(&client, &server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_what_it_cannot_take() {
    let server = Server::start("").expect("server");
    let client = client();
    let offer = genuine_offer(&server, "test").await.expect("offer");

    // 415: not application/sdp.
    let resp = client
        .post(server.url("/whip/test"))
        .header(header::CONTENT_TYPE, "text/plain")
        .body(offer.clone())
        .send()
        .await
        .expect("POST");
    let (_, body) = expect_problem(resp, StatusCode::UNSUPPORTED_MEDIA_TYPE, "text/plain").await;
    assert!(detail(&body).contains("application/sdp"), "{body}");
    let resp = client
        .post(server.url("/whip/test"))
        .body(offer.clone())
        .send()
        .await
        .expect("POST");
    expect_problem(resp, StatusCode::UNSUPPORTED_MEDIA_TYPE, "no Content-Type").await;

    // 400: not SDP at all.
    let resp = post_sdp(&client, &server, "test", None, "hello")
        .await
        .expect("POST");
    expect_problem(resp, StatusCode::BAD_REQUEST, "hello").await;
    let resp = post_sdp(&client, &server, "test", None, vec![b'v', b'=', 0xff, 0xfe])
        .await
        .expect("POST");
    expect_problem(resp, StatusCode::BAD_REQUEST, "not UTF-8").await;

    // 422: a video codec we neither copy nor decode (H265 only; VP8, VP9
    // and AV1 are taken and encoded by the default preset, see
    // tests/e2e.rs).
    let h265 = offer.replace("H264/90000", "H265/90000");
    assert_ne!(h265, offer, "the genuine offer has no H264 rtpmap: {offer}");
    let resp = post_sdp(&client, &server, "test", None, h265)
        .await
        .expect("POST");
    let (_, body) = expect_problem(resp, StatusCode::UNPROCESSABLE_ENTITY, "H265 only").await;
    assert!(detail(&body).contains("H264"), "{body}");

    // 422: the offer receives instead of sending.
    let recvonly = offer.replace("a=sendonly", "a=recvonly");
    assert_ne!(
        recvonly, offer,
        "the genuine offer is not sendonly: {offer}"
    );
    let resp = post_sdp(&client, &server, "test", None, recvonly)
        .await
        .expect("POST");
    let (_, body) = expect_problem(resp, StatusCode::UNPROCESSABLE_ENTITY, "recvonly").await;
    assert!(detail(&body).contains("recvonly"), "{body}");

    // 422: two video tracks.
    let sections = split_sections(&offer);
    let video = sections
        .iter()
        .find(|s| s.starts_with("m=video"))
        .expect("a video section");
    let copy: String = video
        .split_inclusive('\n')
        .map(|l| {
            if l.starts_with("a=mid:") {
                "a=mid:dup\r\n".to_owned()
            } else {
                l.to_owned()
            }
        })
        .collect();
    let two_videos = format!("{}{copy}", sections.concat());
    assert_eq!(two_videos.matches("m=video").count(), 2);
    let resp = post_sdp(&client, &server, "test", None, two_videos)
        .await
        .expect("POST");
    let (_, body) = expect_problem(resp, StatusCode::UNPROCESSABLE_ENTITY, "two videos").await;
    assert!(detail(&body).contains("more than one video"), "{body}");

    // 404: a stream name that cannot be one.
    let resp = post_sdp(&client, &server, ".hidden", None, offer.clone())
        .await
        .expect("POST");
    expect_problem(resp, StatusCode::NOT_FOUND, "stream `.hidden`").await;

    // None of that created a session: the genuine offer is still welcome.
    let resp = post_sdp(&client, &server, "test", None, offer)
        .await
        .expect("POST");
    assert_eq!(resp.status(), StatusCode::CREATED);

    assert_alive(&client, &server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_401_and_disabled_403() {
    let config =
        format!("[streams.secret]\ntokens = [\"{TOKEN}\"]\n\n[streams.off]\nenabled = false\n");
    let server = Server::start(&config).expect("server");
    let client = client();
    let offer = genuine_offer(&server, "secret").await.expect("offer");

    for (token, what) in [
        (None, "no token"),
        (Some("a-long-secret-2"), "wrong token"),
        (Some(""), "empty token"),
    ] {
        let resp = post_sdp(&client, &server, "secret", token, offer.clone())
            .await
            .expect("POST");
        let (h, _) = expect_problem(resp, StatusCode::UNAUTHORIZED, what).await;
        let challenge = header_str(&h, header::WWW_AUTHENTICATE);
        assert!(challenge.starts_with("Bearer"), "{what}: {challenge:?}");
    }
    // Not a bearer token at all.
    let resp = client
        .post(server.url("/whip/secret"))
        .header(header::CONTENT_TYPE, "application/sdp")
        .basic_auth("user", Some(TOKEN))
        .body(offer.clone())
        .send()
        .await
        .expect("POST");
    expect_problem(resp, StatusCode::UNAUTHORIZED, "basic auth").await;

    let resp = post_sdp(&client, &server, "secret", Some(TOKEN), offer.clone())
        .await
        .expect("POST");
    assert_eq!(resp.status(), StatusCode::CREATED);
    let location = header_str(resp.headers(), header::LOCATION).to_owned();
    assert!(location.starts_with("/whip/secret/"), "{location}");

    // Ending the session needs the token too.
    let resp = client
        .delete(server.url(&location))
        .send()
        .await
        .expect("DELETE");
    expect_problem(resp, StatusCode::UNAUTHORIZED, "DELETE without token").await;
    let resp = client
        .delete(server.url(&location))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("DELETE");
    assert_eq!(resp.status(), StatusCode::OK);

    // 403: a disabled stream.
    let resp = post_sdp(&client, &server, "off", None, offer)
        .await
        .expect("POST");
    let (_, body) = expect_problem(resp, StatusCode::FORBIDDEN, "disabled stream").await;
    assert!(detail(&body).contains("off"), "{body}");

    assert_alive(&client, &server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_the_limit_is_413() {
    let server = Server::start("[server]\nmax_body_bytes = 2048\n").expect("server");
    let client = client();
    let mut big = String::from("v=0\r\n");
    while big.len() < 10 * 1024 {
        big.push_str("a=x-padding:0123456789abcdef0123456789abcdef\r\n");
    }
    let resp = post_sdp(&client, &server, "test", None, big)
        .await
        .expect("POST");
    // The 413 comes from axum's body limit; the router turns it into a
    // problem document like every other error.
    expect_problem(resp, StatusCode::PAYLOAD_TOO_LARGE, "10 KB offer").await;
    assert_alive(&client, &server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_capacity_is_503() {
    let server = Server::start("[server]\nmax_sessions = 1\n").expect("server");
    let client = client();
    let offer = genuine_offer(&server, "one").await.expect("offer");
    let resp = post_sdp(&client, &server, "one", None, offer.clone())
        .await
        .expect("POST");
    assert_eq!(resp.status(), StatusCode::CREATED);
    let location = header_str(resp.headers(), header::LOCATION).to_owned();
    let resp = post_sdp(&client, &server, "two", None, offer.clone())
        .await
        .expect("POST");
    let (h, _) = expect_problem(resp, StatusCode::SERVICE_UNAVAILABLE, "second session").await;
    assert!(h.get(header::RETRY_AFTER).is_some(), "{h:?}");
    // Room again once the first session ends.
    let resp = client
        .delete(server.url(&location))
        .send()
        .await
        .expect("DELETE");
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = post_sdp(&client, &server, "two", None, offer)
        .await
        .expect("POST");
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_alive(&client, &server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_things_are_404() {
    let server = Server::start(&format!("# {CONFIG_MARKER}\n")).expect("server");
    let client = client();
    let get = |path: &str| client.get(server.url(path)).send();

    let resp = client
        .delete(server.url("/whip/test/0123456789abcdef0123456789abcdef"))
        .send()
        .await
        .expect("DELETE");
    expect_problem(resp, StatusCode::NOT_FOUND, "unknown session").await;

    let resp = get("/hls/nope/index.m3u8").await.expect("GET");
    expect_problem(resp, StatusCode::NOT_FOUND, "no such stream").await;
    let resp = get("/hls/nope/seg1.ts").await.expect("GET");
    expect_problem(resp, StatusCode::NOT_FOUND, "no such segment").await;

    // The config file is at DIR/whipgate.toml, the HLS at DIR/data/hls/STREAM.
    assert!(server.dir.path().join("whipgate.toml").exists());
    std::fs::create_dir_all(server.hls_dir("test")).expect("HLS dir");
    for path in [
        "/hls/test/..%2F..%2F..%2Fwhipgate.toml",
        "/hls/test/..%2Fwhipgate.toml",
        "/hls/test/%2e%2e%2f%2e%2e%2f%2e%2e%2fwhipgate.toml",
        "/hls/..%2F..%2F..%2F/whipgate.toml",
        "/hls/..%2F..%2F/index.m3u8",
        "/hls/test/..%5C..%5C..%5Cwhipgate.toml",
        "/hls/test/whipgate.toml",
        "/hls/test/seg1.ts%00.toml",
    ] {
        let resp = get(path).await.expect("GET");
        let (_, body) = expect_problem(resp, StatusCode::NOT_FOUND, path).await;
        assert!(!body.to_string().contains(CONFIG_MARKER), "{path}: {body}");
    }
    // Dot segments as sent, which reqwest would have normalised away.
    for path in [
        "/hls/../whipgate.toml",
        "/hls/%2e%2e/whipgate.toml",
        "/hls/test/../../../whipgate.toml",
        "/hls/test/..%2f..%2f..%2fwhipgate.toml",
    ] {
        let (status, response) = raw_get(&server, path).await;
        assert_eq!(status, 404, "{path}: {response}");
        assert!(!response.contains(CONFIG_MARKER), "{path}: {response}");
    }

    assert_alive(&client, &server).await;
}

// Errors that axum makes itself, not `AppError` (no route, a method a route
// lacks, a path that is not UTF-8, the body limit), are problem documents too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_axum_makes_are_problems_too() {
    let server = Server::start("").expect("server");
    let client = client();
    let mut wrong = Vec::new();
    for (method, path, status) in [
        (Method::GET, "/nope", StatusCode::NOT_FOUND),
        (Method::GET, "/hls/test/a/b", StatusCode::NOT_FOUND),
        (Method::PUT, "/whip/test", StatusCode::METHOD_NOT_ALLOWED),
        (
            Method::POST,
            "/hls/test/index.m3u8",
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (Method::GET, "/hls/%ff/index.m3u8", StatusCode::BAD_REQUEST),
    ] {
        let resp = client
            .request(method.clone(), server.url(path))
            .send()
            .await
            .expect("request");
        let got = resp.status();
        let content_type = header_str(resp.headers(), header::CONTENT_TYPE).to_owned();
        let body = resp.text().await.unwrap_or_default();
        if got != status || content_type != PROBLEM_JSON {
            wrong.push(format!(
                "{method} {path}: {got} {content_type:?} {body:?} (expected {status} {PROBLEM_JSON})"
            ));
        }
    }
    assert_alive(&client, &server).await;
    assert!(
        wrong.is_empty(),
        "errors that are not problems:\n{}",
        wrong.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_never_connects_is_dropped() {
    let server = Server::start("[streams.ghost]\ntakeover = \"never\"\n").expect("server");
    let client = client();
    let offer = genuine_offer(&server, "ghost").await.expect("offer");
    // Answered, but the client never does ICE or DTLS.
    let resp = post_sdp(&client, &server, "ghost", None, &offer)
        .await
        .expect("POST");
    assert_eq!(resp.status(), StatusCode::CREATED);
    let resp = post_sdp(&client, &server, "ghost", None, &offer)
        .await
        .expect("POST");
    expect_problem(resp, StatusCode::CONFLICT, "while the first is pending").await;
    // The handshake timeout (10 s) frees the stream.
    let started = std::time::Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let resp = post_sdp(&client, &server, "ghost", None, &offer)
            .await
            .expect("POST");
        if resp.status() == StatusCode::CREATED {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the unconnected session was never dropped"
        );
    }
    assert!(server.log().contains("ICE/DTLS did not complete in time"));
}
