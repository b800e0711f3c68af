//! Several nodes: redirect mode (307) to the least-loaded peer and by stream
//! pattern, with real servers and a real publication through the redirect.

mod support;

use std::time::Duration;

use reqwest::{StatusCode, header, redirect};
use support::hls_check::{Expect, check_hls};
use support::server::{Server, publish_cli, sample_mkv, wait_for};
use support::whip_http::{genuine_offer, header_str};

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .no_proxy()
        .build()
        .expect("client")
}

async fn post(client: &reqwest::Client, url: &str, offer: &str) -> reqwest::Response {
    client
        .post(url)
        .header(header::CONTENT_TYPE, "application/sdp")
        .body(offer.to_owned())
        .send()
        .await
        .expect("POST")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offers_go_to_the_least_loaded_peer_and_its_session_url_works() {
    // b is the bigger node: 1/100 is always less loaded than a's 1/4, even
    // while a's view of b lags a poll behind.
    let b = Server::start("[server]\nmax_sessions = 100\n").expect("node b");
    let a = Server::start(&format!(
        "[server]\nmax_sessions = 4\n[cluster]\npeers = [\"{}\"]\npoll_interval = 0.2\n",
        b.url("")
    ))
    .expect("node a");
    // A publisher on a for the whole test: a is at 1/4, b at 0/100.
    let _busy = tokio::process::Command::new(env!("CARGO_BIN_EXE_whipgate"))
        .arg("publish")
        .arg(sample_mkv())
        .arg(a.url("/whip/here"))
        .args(["--loop", "--duration", "40"])
        .env("WHIPGATE_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("publisher on a");
    let http = no_redirects();
    wait_for("a session on a", Duration::from_secs(10), || {
        a.log().contains("session created").then_some(())
    })
    .await
    .unwrap();

    // Once a has polled b, a new offer goes to b with a 307 (never 301/302).
    let offer = genuine_offer(&a, "far").await.expect("offer");
    let mut redirected = None;
    for _ in 0..50 {
        let resp = post(&http, &a.url("/whip/far"), &offer).await;
        if resp.status() == StatusCode::TEMPORARY_REDIRECT {
            redirected = Some(header_str(resp.headers(), header::LOCATION).to_owned());
            break;
        }
        // Not polled yet: a took it itself; free it and try again.
        assert_eq!(resp.status(), StatusCode::CREATED);
        let session = header_str(resp.headers(), header::LOCATION).to_owned();
        let del = http.delete(a.url(&session)).send().await.expect("DELETE");
        assert_eq!(del.status(), StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let location = redirected.expect("a redirected the offer");
    assert_eq!(location, b.url("/whip/far?redirected=1"));

    // b takes a redirected offer (never redirects it again); its session URL
    // works directly on b.
    let resp = post(&http, &location, &offer).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let session = header_str(resp.headers(), header::LOCATION).to_owned();
    let session_url = url::Url::parse(&location).unwrap().join(&session).unwrap();
    assert!(session_url.as_str().starts_with(&b.url("/whip/far/")));
    let del = http.delete(session_url).send().await.expect("DELETE");
    assert_eq!(del.status(), StatusCode::OK);
    assert!(a.log().contains("offer redirected (307)"), "{}", a.log());

    // A real publisher pointed at a: it follows the 307 and b gets the HLS.
    publish_cli(
        &sample_mkv(),
        &a.url("/whip/through"),
        &[],
        "warn",
        Duration::from_secs(30),
    )
    .await;
    assert!(!a.hls_dir("through").exists(), "a kept the stream");
    check_hls(
        &b,
        "through",
        Expect {
            sent_secs: 10.0,
            codecs: &["h264", "aac"],
            size: Some((640, 360)),
            lip_sync: None,
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_send_streams_by_name_and_peers_that_are_down_are_skipped() {
    let dead = support::server::free_tcp_port();
    let a = Server::start(&format!(
        "[cluster]\npeers = [\"http://127.0.0.1:{dead}\"]\npoll_interval = 0.2\n\
         [[cluster.routes]]\npattern = \"eu-*\"\nurl = \"https://eu.example.com/whip/{{stream}}\"\n"
    ))
    .expect("node a");
    let http = no_redirects();
    let resp = post(&http, &a.url("/whip/eu-cam"), "v=0\r\n").await;
    assert_eq!(resp.status(), StatusCode::TEMPORARY_REDIRECT);
    assert_eq!(
        header_str(resp.headers(), header::LOCATION),
        "https://eu.example.com/whip/eu-cam?redirected=1"
    );
    // The peer never answers its load: a keeps the offers it gets.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let offer = genuine_offer(&a, "cam").await.expect("offer");
    let resp = post(&http, &a.url("/whip/cam"), &offer).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    // Its load is public for balancers.
    let load: serde_json::Value = http
        .get(a.url("/cluster/load"))
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("json");
    assert_eq!(load["sessions"], 1);
    assert_eq!(load["max_sessions"], 500);
}
