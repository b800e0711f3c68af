mod support;

// RFC 9725 conformance of the session resource (trickle ICE, GET, OPTIONS,
// DELETE) and publishing authorization (static tokens, JWT, HTTP callback),
// against the real server binary with genuine webrtc-rs offers.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::header::{self, HeaderMap};
use reqwest::{Client, Method, StatusCode};
use support::server::Server;
use support::whip_http::{client, detail, expect_problem, genuine_offer, header_str, post_sdp};

const TRICKLE: &str = "application/trickle-ice-sdpfrag";
const JWT_SECRET: &str = "jwt-secret-0123456789abcdef-0123456789";

/// A created session: its URL path, ETag and headers of the 201.
struct Session {
    location: String,
    etag: String,
    headers: HeaderMap,
}

async fn create(client: &Client, server: &Server, stream: &str, token: Option<&str>) -> Session {
    let offer = genuine_offer(server, stream).await.expect("offer");
    let resp = post_sdp(client, server, stream, token, &offer)
        .await
        .expect("POST");
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.text().await.unwrap_or_default();
    assert_eq!(status, StatusCode::CREATED, "POST {stream}: {body}");
    Session {
        location: header_str(&headers, header::LOCATION).to_owned(),
        etag: header_str(&headers, header::ETAG).to_owned(),
        headers,
    }
}

/// The fragment that only ends the candidates.
const END: &str = "a=end-of-candidates\r\n";

/// PATCH of a trickle fragment (`application/trickle-ice-sdpfrag`) to
/// `url`, with `If-Match` when given.
async fn trickle(
    client: &Client,
    url: String,
    if_match: Option<&str>,
    fragment: &str,
) -> reqwest::Response {
    let mut req = client.patch(url).header(header::CONTENT_TYPE, TRICKLE);
    if let Some(tag) = if_match {
        req = req.header(header::IF_MATCH, tag);
    }
    req.body(fragment.to_owned()).send().await.expect("PATCH")
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

fn hs256(claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .expect("JWT")
}

fn assert_no_panic(server: &Server) {
    let log = server.log();
    assert!(!log.contains("panicked"), "the server panicked:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickle_patch_status_codes() {
    let server = Server::start("").expect("server");
    let client = client();
    let s = create(&client, &server, "trickle", None).await;
    assert_eq!(header_str(&s.headers, "accept-patch"), TRICKLE);
    assert!(
        s.etag.starts_with('"') && s.etag.ends_with('"'),
        "{}",
        s.etag
    );

    // 428: no If-Match.
    let resp = trickle(&client, server.url(&s.location), None, END).await;
    expect_problem(resp, StatusCode::PRECONDITION_REQUIRED, "no If-Match").await;

    // 412: a stale or foreign ETag (a weak tag never matches strongly).
    let weak = format!("W/{}", s.etag);
    for tag in ["\"0000\"", weak.as_str()] {
        let resp = trickle(&client, server.url(&s.location), Some(tag), END).await;
        expect_problem(resp, StatusCode::PRECONDITION_FAILED, tag).await;
    }

    // 415: not a trickle fragment; Accept-Patch says what is.
    let resp = client
        .patch(server.url(&s.location))
        .header(header::CONTENT_TYPE, "application/sdp")
        .header(header::IF_MATCH, &s.etag)
        .body(END)
        .send()
        .await
        .expect("PATCH");
    let (h, body) =
        expect_problem(resp, StatusCode::UNSUPPORTED_MEDIA_TYPE, "application/sdp").await;
    assert!(detail(&body).contains(TRICKLE), "{body}");
    assert_eq!(header_str(&h, "accept-patch"), TRICKLE);

    // 400: not a fragment, a broken candidate.
    for bad in [
        "hello",
        "a=candidate:1 1 udp notapriority 127.0.0.1 5000 typ host\r\n",
        "a=candidate:1 1 udp 2130706431 127.0.0.1\r\n",
    ] {
        let resp = trickle(&client, server.url(&s.location), Some(&s.etag), bad).await;
        expect_problem(resp, StatusCode::BAD_REQUEST, bad).await;
    }

    // ICE restart without new credentials: 400, and the session goes on.
    let resp = trickle(
        &client,
        server.url(&s.location),
        Some("*"),
        "a=candidate:1 1 udp 2122260223 127.0.0.1 61764 typ host\r\n",
    )
    .await;
    let (_, body) = expect_problem(resp, StatusCode::BAD_REQUEST, "restart, no creds").await;
    assert!(detail(&body).contains("ice-pwd"), "{body}");

    // ICE restart: 200, the server's new sdpfrag and a new ETag.
    let resp = trickle(
        &client,
        server.url(&s.location),
        Some("*"),
        "a=ice-ufrag:newU\r\na=ice-pwd:newpasswordnewpassword12\r\n\
             a=candidate:1 1 udp 2122260223 127.0.0.1 61765 typ host\r\n",
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let h = resp.headers().clone();
    assert_eq!(header_str(&h, header::CONTENT_TYPE), TRICKLE);
    let new_etag = header_str(&h, header::ETAG).to_owned();
    assert!(new_etag.starts_with('"') && new_etag != s.etag, "{h:?}");
    let frag = resp.text().await.expect("body");
    for want in [
        "a=ice-lite",
        "a=ice-ufrag:",
        "a=ice-pwd:",
        "a=mid:",
        "a=candidate:",
        "a=group:BUNDLE",
    ] {
        assert!(frag.contains(want), "{want} missing in {frag}");
    }
    let ufrags: Vec<&str> = frag
        .lines()
        .filter_map(|l| l.strip_prefix("a=ice-ufrag:"))
        .collect();
    assert!(
        !ufrags.is_empty() && ufrags.iter().all(|u| *u == ufrags[0]),
        "{frag}"
    );
    // The old ETag is stale now, the new one matches.
    let resp = trickle(&client, server.url(&s.location), Some(&s.etag), END).await;
    expect_problem(resp, StatusCode::PRECONDITION_FAILED, "old etag").await;
    let resp = trickle(&client, server.url(&s.location), Some(&new_etag), END).await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);

    // 404: an unknown session.
    let resp = trickle(
        &client,
        server.url("/whip/trickle/0123456789abcdef0123456789abcdef"),
        Some(&s.etag),
        END,
    )
    .await;
    expect_problem(resp, StatusCode::NOT_FOUND, "unknown session").await;

    // The session survived all of that.
    let resp = client
        .get(server.url(&s.location))
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_no_panic(&server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickled_candidates_reach_the_session() {
    let server = Server::start("").expect("server");
    let client = client();
    let s = create(&client, &server, "cands", None).await;

    // A fragment as Chrome sends it: a usable UDP host candidate, an mDNS
    // one and an ICE-TCP one (both dropped silently), end of candidates.
    let fragment = "a=ice-options:trickle ice2\r\n\
        a=group:BUNDLE 0 1\r\n\
        m=audio 9 UDP/TLS/RTP/SAVPF 111\r\n\
        a=mid:0\r\n\
        a=candidate:1387637174 1 udp 2122260223 127.0.0.1 61764 typ host generation 0 network-id 1\r\n\
        a=candidate:2 1 udp 2113937151 8a3c9e8e-1f2b-4d3c-9e8e-1f2b4d3c9e8e.local 54321 typ host generation 0\r\n\
        a=candidate:473322822 1 tcp 1518280447 127.0.0.1 9 typ host tcptype active generation 0 network-id 1\r\n\
        a=end-of-candidates\r\n";
    let resp = trickle(&client, server.url(&s.location), Some(&s.etag), fragment).await;
    let status = resp.status();
    let body = resp.text().await.expect("body");
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    assert!(body.is_empty(), "a 204 with a body: {body:?}");

    // A list of tags including ours matches too; end-of-candidates alone is fine.
    let resp = trickle(
        &client,
        server.url(&s.location),
        Some(&format!("\"other\", {}", s.etag)),
        END,
    )
    .await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);

    // The UDP candidate reached str0m; the others did not.
    let log = support::server::wait_for(
        "the trickled candidate in the log",
        Duration::from_secs(15),
        || {
            let log = server.log();
            log.contains("remote candidate trickled").then_some(log)
        },
    )
    .await
    .expect("log");
    let trickled: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("remote candidate trickled"))
        .collect();
    assert_eq!(trickled.len(), 1, "{trickled:?}");
    assert!(trickled[0].contains("127.0.0.1 61764"), "{trickled:?}");
    assert!(!log.contains(".local 54321 typ host"), "{log}");

    // DELETE ignores If-Match, even a stale one.
    let resp = client
        .delete(server.url(&s.location))
        .header(header::IF_MATCH, "\"stale\"")
        .send()
        .await
        .expect("DELETE");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_no_panic(&server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_and_get_on_the_session() {
    let server = Server::start("").expect("server");
    let client = client();
    let s = create(&client, &server, "opts", None).await;

    let resp = client
        .request(Method::OPTIONS, server.url(&s.location))
        .header(header::ORIGIN, "https://example.com")
        .header(header::ACCESS_CONTROL_REQUEST_METHOD, "PATCH")
        .send()
        .await
        .expect("OPTIONS");
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let h = resp.headers().clone();
    assert_eq!(header_str(&h, "accept-patch"), TRICKLE);
    for m in ["PATCH", "DELETE", "GET"] {
        assert!(header_str(&h, header::ALLOW).contains(m), "{h:?}");
        assert!(
            header_str(&h, header::ACCESS_CONTROL_ALLOW_METHODS).contains(m),
            "{h:?}"
        );
    }
    assert!(
        header_str(&h, header::ACCESS_CONTROL_ALLOW_HEADERS).contains("If-Match"),
        "{h:?}"
    );
    assert!(
        header_str(&h, header::ACCESS_CONTROL_EXPOSE_HEADERS).contains("Accept-Patch"),
        "{h:?}"
    );
    assert!(resp.text().await.expect("body").is_empty());

    // GET on the session and on the endpoint: 2xx, no body.
    for path in [s.location.as_str(), "/whip/opts"] {
        let resp = client.get(server.url(path)).send().await.expect("GET");
        assert!(resp.status().is_success(), "GET {path}: {}", resp.status());
        assert!(resp.text().await.expect("body").is_empty(), "GET {path}");
    }
    let resp = client
        .get(server.url("/whip/opts/0123456789abcdef0123456789abcdef"))
        .send()
        .await
        .expect("GET");
    expect_problem(resp, StatusCode::NOT_FOUND, "GET unknown session").await;
    assert_no_panic(&server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickle_turned_off_is_422_but_patch_stays_for_ice_restarts() {
    let server = Server::start("[webrtc]\ntrickle = false\n").expect("server");
    let client = client();
    let s = create(&client, &server, "notrickle", None).await;
    // PATCH is still supported (ICE restarts), with the same media type.
    assert_eq!(header_str(&s.headers, "accept-patch"), TRICKLE);

    let resp = client
        .request(Method::OPTIONS, server.url(&s.location))
        .send()
        .await
        .expect("OPTIONS");
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_eq!(header_str(resp.headers(), "accept-patch"), TRICKLE);
    assert!(header_str(resp.headers(), header::ALLOW).contains("PATCH"));

    let resp = trickle(
        &client,
        server.url(&s.location),
        Some(&s.etag),
        "a=candidate:1 1 udp 2122260223 127.0.0.1 61764 typ host\r\n",
    )
    .await;
    let (_, body) = expect_problem(resp, StatusCode::UNPROCESSABLE_ENTITY, "trickle off").await;
    assert!(detail(&body).contains("trickle"), "{body}");
    assert_no_panic(&server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_hs256() {
    let config =
        format!("[auth.jwt]\nalgorithm = \"HS256\"\nsecret = \"{JWT_SECRET}\"\nleeway = 0\n");
    let server = Server::start(&config).expect("server");
    let client = client();
    let offer = genuine_offer(&server, "cam-1").await.expect("offer");
    let exp = now() + 600;

    for (what, claims) in [
        (
            "expired",
            serde_json::json!({"stream": "cam-1", "exp": now() - 120}),
        ),
        (
            "wrong stream",
            serde_json::json!({"stream": "studio", "exp": exp}),
        ),
        (
            "nbf in the future",
            serde_json::json!({"stream": "cam-1", "exp": exp, "nbf": now() + 300}),
        ),
        ("no stream claim", serde_json::json!({"exp": exp})),
    ] {
        let resp = post_sdp(&client, &server, "cam-1", Some(&hs256(claims)), &offer)
            .await
            .expect("POST");
        let (h, _) = expect_problem(resp, StatusCode::UNAUTHORIZED, what).await;
        assert!(header_str(&h, header::WWW_AUTHENTICATE).starts_with("Bearer"));
    }
    let resp = post_sdp(&client, &server, "cam-1", None, &offer)
        .await
        .expect("POST");
    expect_problem(resp, StatusCode::UNAUTHORIZED, "no token").await;

    // A pattern claim allowing the stream.
    let token = hs256(serde_json::json!({"stream": "cam-*", "exp": exp}));
    let resp = post_sdp(&client, &server, "cam-1", Some(&token), &offer)
        .await
        .expect("POST");
    assert_eq!(resp.status(), StatusCode::CREATED);
    let location = header_str(resp.headers(), header::LOCATION).to_owned();
    let etag = header_str(resp.headers(), header::ETAG).to_owned();

    // The session resource needs the same token.
    let other = hs256(serde_json::json!({"stream": "cam-*", "exp": exp + 1}));
    for token in [None, Some(other.as_str())] {
        let mut req = client.delete(server.url(&location));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.expect("DELETE");
        expect_problem(resp, StatusCode::UNAUTHORIZED, "DELETE, other token").await;
    }
    let resp = trickle(&client, server.url(&location), Some(&etag), END).await;
    expect_problem(resp, StatusCode::UNAUTHORIZED, "PATCH without token").await;
    let resp = client
        .patch(server.url(&location))
        .bearer_auth(&token)
        .header(header::CONTENT_TYPE, TRICKLE)
        .header(header::IF_MATCH, &etag)
        .body(END)
        .send()
        .await
        .expect("PATCH");
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let resp = client
        .delete(server.url(&location))
        .bearer_auth(&token)
        .send()
        .await
        .expect("DELETE");
    assert_eq!(resp.status(), StatusCode::OK);

    // Tokens never reach the log.
    let log = server.log();
    assert!(!log.contains(&token), "a token was logged");
    assert_no_panic(&server);
}

/// `openssl genpkey` with these options: (private key PEM, public key PEM).
fn openssl_keypair(dir: &std::path::Path, name: &str, options: &[&str]) -> (Vec<u8>, String) {
    let private = dir.join(format!("{name}.key"));
    let public = dir.join(format!("{name}.pub"));
    let out = std::process::Command::new("openssl")
        .arg("genpkey")
        .args(options)
        .arg("-out")
        .arg(&private)
        .output()
        .expect("running openssl genpkey");
    assert!(
        out.status.success(),
        "openssl genpkey {options:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = std::process::Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&private)
        .arg("-out")
        .arg(&public)
        .output()
        .expect("running openssl pkey");
    assert!(
        out.status.success(),
        "openssl pkey -pubout: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        std::fs::read(&private).expect("private key"),
        public.display().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_rs256_and_es256_with_openssl_keys() {
    let keys = tempfile::tempdir().expect("tempdir");
    let (rsa_private, rsa_public) = openssl_keypair(
        keys.path(),
        "rsa",
        &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
    );
    let (ec_private, ec_public) = openssl_keypair(
        keys.path(),
        "ec",
        &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
    );
    let claims = serde_json::json!({"stream": "signed", "exp": now() + 600, "nbf": now() - 10});

    for (alg, public, token) in [
        (
            "RS256",
            &rsa_public,
            jsonwebtoken::encode(
                &Header::new(Algorithm::RS256),
                &claims,
                &EncodingKey::from_rsa_pem(&rsa_private).expect("RSA key"),
            )
            .expect("RS256 JWT"),
        ),
        (
            "ES256",
            &ec_public,
            jsonwebtoken::encode(
                &Header::new(Algorithm::ES256),
                &claims,
                &EncodingKey::from_ec_pem(&ec_private).expect("EC key"),
            )
            .expect("ES256 JWT"),
        ),
    ] {
        let config = format!(
            "[auth.jwt]\nalgorithm = \"{alg}\"\npublic_key_file = \"{public}\"\naudience = \"whipgate\"\n"
        );
        // The audience is required once configured.
        let server =
            Server::start(&config.replace("audience = \"whipgate\"\n", "")).expect("server");
        let client = client();
        let offer = genuine_offer(&server, "signed").await.expect("offer");
        let resp = post_sdp(&client, &server, "signed", Some(&token), &offer)
            .await
            .expect("POST");
        assert_eq!(resp.status(), StatusCode::CREATED, "{alg}");
        // A token with another algorithm is refused.
        let resp = post_sdp(
            &client,
            &server,
            "signed2",
            Some(&hs256(claims.clone())),
            &offer,
        )
        .await
        .expect("POST");
        expect_problem(resp, StatusCode::UNAUTHORIZED, "HS256 token").await;
        drop(server);

        let server = Server::start(&config).expect("server");
        let resp = post_sdp(&client, &server, "signed", Some(&token), &offer)
            .await
            .expect("POST");
        expect_problem(resp, StatusCode::UNAUTHORIZED, "no aud claim").await;
    }

    // The key file is checked at start, naming the key.
    let err = Server::start(&format!(
        "[auth.jwt]\nalgorithm = \"RS256\"\npublic_key_file = \"{}\"\n",
        keys.path().join("rsa.key").display()
    ))
    .err()
    .expect("a private key as public key is refused");
    assert!(
        err.to_string().contains("auth.jwt.public_key_file"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_config_errors_name_the_key() {
    for (config, key) in [
        ("[auth.jwt]\nalgorithm = \"HS256\"\n", "auth.jwt.secret"),
        (
            "[auth.jwt]\nalgorithm = \"HS256\"\nsecret = \"short\"\n",
            "auth.jwt.secret",
        ),
        ("[auth]\ntokenz = []\n", "tokenz"),
        (
            "[auth.callback]\nurl = \"ftp://example.com/\"\n",
            "auth.callback.url",
        ),
        (
            "[auth.callback]\nurl = \"http://example.com/\"\ntimeout = 0.0\n",
            "auth.callback.timeout",
        ),
    ] {
        let err = Server::start(config)
            .err()
            .unwrap_or_else(|| panic!("{config:?} was accepted"));
        assert!(err.to_string().contains(key), "{config:?}: {err}");
    }
}

/// What the callback server saw: one JSON body per request.
type Seen = Arc<Mutex<Vec<serde_json::Value>>>;

/// A callback service: 204 for the token "good", 403 for anything else.
async fn callback_server() -> (SocketAddr, Seen) {
    let seen: Seen = Arc::default();
    let record = seen.clone();
    let app = axum::Router::new().route(
        "/auth",
        axum::routing::post(move |axum::Json(body): axum::Json<serde_json::Value>| {
            let record = record.clone();
            async move {
                let good = body["token"] == "good";
                record.lock().expect("lock").push(body);
                if good {
                    axum::http::StatusCode::NO_CONTENT
                } else {
                    axum::http::StatusCode::FORBIDDEN
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_callback_allows_denies() {
    let (addr, seen) = callback_server().await;
    let config = format!(
        "[auth.callback]\nurl = \"http://{addr}/auth\"\ntimeout = 2.0\n\n\
         [streams.fixed]\ntokens = [\"static-token-1\"]\n"
    );
    let server = Server::start(&config).expect("server");
    let client = client();
    let offer = genuine_offer(&server, "viacb").await.expect("offer");

    let resp = post_sdp(&client, &server, "viacb", Some("bad"), &offer)
        .await
        .expect("POST");
    expect_problem(resp, StatusCode::UNAUTHORIZED, "callback says 403").await;
    let resp = post_sdp(&client, &server, "viacb", None, &offer)
        .await
        .expect("POST");
    expect_problem(resp, StatusCode::UNAUTHORIZED, "no token").await;
    let resp = post_sdp(&client, &server, "viacb", Some("good"), &offer)
        .await
        .expect("POST");
    assert_eq!(resp.status(), StatusCode::CREATED);

    // A static token is enough on its own: the callback is not asked.
    let before = seen.lock().expect("lock").len();
    let resp = post_sdp(&client, &server, "fixed", Some("static-token-1"), &offer)
        .await
        .expect("POST");
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(seen.lock().expect("lock").len(), before);

    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    let last = &seen[1];
    assert_eq!(last["stream"], "viacb");
    assert_eq!(last["token"], "good");
    assert_eq!(last["client_ip"], "127.0.0.1");
    assert_eq!(last["action"], "publish");
    assert_no_panic(&server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_callback_is_503() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let config =
        format!("[auth.callback]\nurl = \"http://127.0.0.1:{port}/auth\"\ntimeout = 1.0\n");
    let server = Server::start(&config).expect("server");
    let client = client();
    let offer = genuine_offer(&server, "cb").await.expect("offer");
    let resp = post_sdp(&client, &server, "cb", Some("good"), &offer)
        .await
        .expect("POST");
    let (h, _) = expect_problem(resp, StatusCode::SERVICE_UNAVAILABLE, "callback down").await;
    assert!(h.get(header::RETRY_AFTER).is_some(), "{h:?}");
    assert_no_panic(&server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_ip_rate_limit_on_post_patch_delete_is_429_with_retry_after() {
    let server = Server::start(
        "[server.rate_limit]\nper_second = 0.5\nburst = 3\nexempt_loopback = false\n",
    )
    .expect("server");
    let client = client();
    // Three costly requests pass (and fail on their own merits)...
    let url = server.url("/whip/limited");
    for _ in 0..2 {
        let resp = client
            .post(&url)
            .body("not sdp")
            .send()
            .await
            .expect("POST");
        assert_eq!(resp.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }
    let resp = client
        .delete(server.url("/whip/limited/0123456789abcdef0123456789abcdef"))
        .send()
        .await
        .expect("DELETE");
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    // ...the next POST, PATCH or DELETE of this IP waits.
    for req in [
        client.post(&url).body("v=0\r\n"),
        client.patch(server.url("/whip/limited/0123456789abcdef0123456789abcdef")),
        client.delete(server.url("/whip/limited/0123456789abcdef0123456789abcdef")),
    ] {
        let resp = req.send().await.expect("request");
        let retry: u64 = header_str(resp.headers(), header::RETRY_AFTER)
            .parse()
            .expect("Retry-After in seconds");
        assert!((1..=2).contains(&retry), "Retry-After {retry}");
        let (_, body) = expect_problem(resp, StatusCode::TOO_MANY_REQUESTS, "over the rate").await;
        assert!(detail(&body).contains("retry"), "{body}");
    }
    // Reads are not limited.
    let resp = client.get(&url).send().await.expect("GET");
    assert!(resp.status().is_success());
    // A token comes back after 2 s.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let resp = client.post(&url).body("x").send().await.expect("POST");
    assert_eq!(resp.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_no_panic(&server);
}
