mod support;

// HTTPS next to HTTP: a self-signed development certificate, certificate
// files made by the `openssl` CLI, reload on SIGHUP without a restart, and
// config errors that name the key.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use reqwest::header::{self, HeaderMap};
use reqwest::{Client, Method, StatusCode};
use support::server::{Server, free_tcp_port};
use support::webrtc_publisher::Publisher;

fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(10))
        .no_proxy()
        .danger_accept_invalid_certs(true)
        .build()
        .expect("an HTTPS client")
}

fn header_str(headers: &HeaderMap, name: impl header::AsHeaderName) -> &str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

/// Starts the server with `args` plus an HTTPS listener on a free port and
/// waits until that port accepts connections.
fn start_https(args: &[&str]) -> anyhow::Result<(Server, u16)> {
    let port = free_tcp_port();
    let listen = format!("127.0.0.1:{port}");
    let mut all = args.to_vec();
    all.extend(["--https-listen", listen.as_str()]);
    let server = Server::start_with_args("", &all)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("HTTPS did not listen on {port}:\n{}", server.log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((server, port))
}

fn sh(script: &str) -> anyhow::Result<String> {
    let out = Command::new("sh").arg("-c").arg(script).output()?;
    ensure!(
        out.status.success(),
        "`{script}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `sha256 Fingerprint=AA:BB:…` → `AA:BB:…`.
fn parse_fingerprint(openssl_out: &str) -> anyhow::Result<String> {
    let fp = openssl_out
        .trim()
        .split_once('=')
        .map(|(_, f)| f.to_ascii_uppercase())
        .with_context(|| format!("no fingerprint in `{openssl_out}`"))?;
    ensure!(fp.len() == 95, "odd fingerprint `{fp}`");
    Ok(fp)
}

/// The SHA-256 fingerprint of the certificate served on `port`.
fn served_fingerprint(port: u16) -> anyhow::Result<String> {
    parse_fingerprint(&sh(&format!(
        "openssl s_client -connect 127.0.0.1:{port} -servername localhost </dev/null 2>/dev/null \
         | openssl x509 -noout -fingerprint -sha256"
    ))?)
}

fn file_fingerprint(cert: &Path) -> anyhow::Result<String> {
    parse_fingerprint(&sh(&format!(
        "openssl x509 -in '{}' -noout -fingerprint -sha256",
        cert.display()
    ))?)
}

/// A P-256 certificate and key for localhost, made by the openssl CLI.
fn make_cert(dir: &Path, name: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    sh(&format!(
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
         -keyout '{}' -out '{}' -days 2 -subj /CN=localhost \
         -addext subjectAltName=DNS:localhost,IP:127.0.0.1 2>&1",
        key.display(),
        cert.display()
    ))?;
    Ok((cert, key))
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_signed_https_serves_whip_next_to_http() {
    let (mut server, port) =
        start_https(&["--tls-self-signed", "--public-address", "192.0.2.10"]).expect("server");
    let base = format!("https://127.0.0.1:{port}");
    let client = client();

    // The certificate: logged fingerprint, names, ALPN.
    let fp = served_fingerprint(port).expect("fingerprint");
    assert!(
        server.log().contains(&fp),
        "{fp} not logged:\n{}",
        server.log()
    );
    let sans = sh(&format!(
        "openssl s_client -connect 127.0.0.1:{port} </dev/null 2>/dev/null \
         | openssl x509 -noout -ext subjectAltName"
    ))
    .expect("SANs");
    for name in [
        "DNS:localhost",
        "IP Address:127.0.0.1",
        "IP Address:192.0.2.10",
    ] {
        assert!(sans.contains(name), "{name} missing: {sans}");
    }
    let alpn = sh(&format!(
        "openssl s_client -connect 127.0.0.1:{port} -alpn h2,http/1.1 </dev/null 2>/dev/null"
    ))
    .expect("s_client");
    assert!(alpn.contains("ALPN protocol: h2"), "{alpn}");
    // HLS requests really go over HTTP/2 (players open many at once).
    let version = sh(&format!(
        "curl -sk --http2 -w '%{{http_version}} %{{http_code}}\\n' -o /dev/null \
         {base}/hls/test/index.m3u8 -o /dev/null {base}/hls/test/480p/index.m3u8"
    ))
    .expect("curl");
    let lines: Vec<&str> = version.lines().collect();
    assert_eq!(lines, ["2 404", "2 404"], "{version}");

    // OPTIONS over HTTPS.
    let resp = client
        .request(Method::OPTIONS, format!("{base}/whip/test"))
        .header(header::ORIGIN, "https://example.com")
        .send()
        .await
        .expect("OPTIONS");
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_eq!(header_str(resp.headers(), "accept-post"), "application/sdp");
    assert_eq!(
        header_str(resp.headers(), header::ACCESS_CONTROL_ALLOW_ORIGIN),
        "*"
    );
    let resp = client
        .get(format!("{base}/whip/test"))
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);

    // A genuine offer: 201, then DELETE of its session, all over HTTPS.
    let url = url::Url::parse(&format!("{base}/whip/test")).expect("url");
    let mut publisher = Publisher::new(&url, true, true).await.expect("publisher");
    let offer = publisher.offer().await;
    publisher.close().await;
    let resp = client
        .post(format!("{base}/whip/test"))
        .header(header::CONTENT_TYPE, "application/sdp")
        .body(offer.expect("offer"))
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status(), StatusCode::CREATED);
    let location = header_str(resp.headers(), header::LOCATION).to_owned();
    assert!(location.starts_with("/whip/test/"), "{location}");
    let resp = client
        .delete(format!("{base}{location}"))
        .send()
        .await
        .expect("DELETE");
    assert_eq!(resp.status(), StatusCode::OK);

    // Plain HTTP still answers.
    let resp = client
        .request(Method::OPTIONS, server.url("/whip/test"))
        .send()
        .await
        .expect("OPTIONS over HTTP");
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);

    // SIGTERM stops both listeners and the process exits cleanly.
    let status = server.terminate().expect("terminate");
    assert!(status.success(), "{status}:\n{}", server.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_files_reload_on_sighup() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (first, first_key) = make_cert(dir.path(), "first").expect("first cert");
    let (second, second_key) = make_cert(dir.path(), "second").expect("second cert");
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::copy(&first, &cert).expect("copy");
    std::fs::copy(&first_key, &key).expect("copy");
    let (cert_arg, key_arg) = (cert.display().to_string(), key.display().to_string());
    let (server, port) =
        start_https(&["--tls-cert", &cert_arg, "--tls-key", &key_arg]).expect("server");
    let pid = server.pid().expect("pid").to_string();
    let client = client();
    let options = |c: &Client| {
        c.request(
            Method::OPTIONS,
            format!("https://127.0.0.1:{port}/whip/test"),
        )
        .send()
    };

    let first_fp = file_fingerprint(&first).expect("fingerprint");
    let second_fp = file_fingerprint(&second).expect("fingerprint");
    assert_ne!(first_fp, second_fp);
    assert_eq!(served_fingerprint(port).expect("served"), first_fp);
    let resp = options(&client).await.expect("OPTIONS");
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);

    // New files, SIGHUP: the new certificate, same process and listener.
    std::fs::copy(&second_key, &key).expect("copy");
    std::fs::copy(&second, &cert).expect("copy");
    sh(&format!("kill -HUP {pid}")).expect("SIGHUP");
    wait_until("the new certificate", || {
        served_fingerprint(port).is_ok_and(|f| f == second_fp)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}:\n{}", server.log()));
    assert_eq!(server.pid().expect("pid").to_string(), pid);
    let resp = options(&client).await.expect("OPTIONS after reload");
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);

    // A broken file: the reload fails, logs, and the served certificate stays.
    std::fs::write(&cert, "not a certificate").expect("write");
    sh(&format!("kill -HUP {pid}")).expect("SIGHUP");
    wait_until("the failed reload in the log", || {
        server.log().contains("reload failed")
    })
    .await
    .unwrap_or_else(|e| panic!("{e}:\n{}", server.log()));
    assert_eq!(served_fingerprint(port).expect("served"), second_fp);
    let resp = options(&client).await.expect("OPTIONS after failed reload");
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
}

/// `whipgate check-config` with `args`: the error output.
fn config_error(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_whipgate"))
        .arg("check-config")
        .args(args)
        .env_remove("WHIPGATE_TLS_CERT")
        .env_remove("WHIPGATE_TLS_KEY")
        .output()
        .expect("check-config");
    assert!(!out.status.success(), "accepted: {args:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn tls_config_errors_name_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = make_cert(dir.path(), "ok").expect("cert");
    let (other_cert, _) = make_cert(dir.path(), "other").expect("cert");
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "-----BEGIN CERTIFICATE-----\nnope\n").expect("write");
    let missing = dir.path().join("missing.pem");
    let [cert, key, other_cert, junk, missing] =
        [cert, key, other_cert, junk, missing].map(|p| p.display().to_string());

    let e = config_error(&["--tls-cert", &cert]);
    assert!(e.contains("server.tls_key"), "{e}");
    let e = config_error(&["--tls-key", &key]);
    assert!(e.contains("server.tls_cert"), "{e}");
    let e = config_error(&["--tls-cert", &missing, "--tls-key", &key]);
    assert!(
        e.contains("server.tls_cert") && e.contains("missing.pem"),
        "{e}"
    );
    let e = config_error(&["--tls-cert", &cert, "--tls-key", &missing]);
    assert!(
        e.contains("server.tls_key") && e.contains("missing.pem"),
        "{e}"
    );
    let e = config_error(&["--tls-cert", &junk, "--tls-key", &key]);
    assert!(e.contains("server.tls_cert") && e.contains("PEM"), "{e}");
    let e = config_error(&["--tls-cert", &cert, "--tls-key", &junk]);
    assert!(e.contains("server.tls_key"), "{e}");
    let e = config_error(&["--tls-cert", &other_cert, "--tls-key", &key]);
    assert!(e.contains("server.tls_key"), "{e}");
    let e = config_error(&["--tls-cert", &cert, "--tls-key", &key, "--tls-self-signed"]);
    assert!(e.contains("server.tls_self_signed"), "{e}");
}
