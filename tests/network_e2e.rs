//! The network is not kind: packet loss between publisher and gateway (the
//! gateway NACKs, the publisher retransmits), a 1:1 NAT address advertised
//! in the candidates, and garbage datagrams on the shared UDP port.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use support::hls_check::{Expect, check_hls};
use support::server::{Server, ffprobe_streams};
use support::webrtc_publisher::{PublishOpts, publish};
use tokio::net::UdpSocket;

/// What the relay saw.
#[derive(Default)]
struct Counters {
    /// RTP packets to the server it dropped.
    dropped: AtomicU64,
    /// Generic NACKs (RTPFB, FMT 1) from the server.
    nacks: AtomicU64,
    /// Transport-wide congestion control feedback (RTPFB, FMT 15) from the
    /// server.
    twcc: AtomicU64,
}

/// A UDP relay standing for a NAT and a lossy path: listens on
/// `public`, forwards to `server`, and drops every `drop_every`-th RTP
/// packet going to the server (STUN, DTLS and RTCP pass). SRTCP leaves the
/// first RTCP header readable, which is how it counts feedback.
async fn lossy_nat(
    public: SocketAddr,
    server: SocketAddr,
    drop_every: u64,
) -> (Arc<Counters>, tokio::task::JoinHandle<()>) {
    let outside = Arc::new(UdpSocket::bind(public).await.expect("bind 127.0.0.2"));
    let inside = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let counters = Arc::new(Counters::default());
    let client: Arc<tokio::sync::Mutex<Option<SocketAddr>>> = Default::default();
    let (o, i, c, d) = (
        outside.clone(),
        inside.clone(),
        client.clone(),
        counters.clone(),
    );
    let up = tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        let mut rtp = 0u64;
        while let Ok((n, from)) = o.recv_from(&mut buf).await {
            *c.lock().await = Some(from);
            let p = &buf[..n];
            // RTP (not RTCP: payload types 72..=79 with the marker bit).
            let is_rtp = n > 12 && (128..192).contains(&p[0]) && !(200..=211).contains(&p[1]);
            if is_rtp {
                rtp += 1;
                if rtp.is_multiple_of(drop_every) {
                    d.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            }
            let _ = i.send_to(p, server).await;
        }
    });
    let seen = counters.clone();
    let down = tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        while let Ok((n, _)) = inside.recv_from(&mut buf).await {
            if n > 4 && (128..192).contains(&buf[0]) && buf[1] == 205 {
                match buf[0] & 0x1f {
                    1 => seen.nacks.fetch_add(1, Ordering::Relaxed),
                    15 => seen.twcc.fetch_add(1, Ordering::Relaxed),
                    _ => 0,
                };
            }
            if let Some(to) = *client.lock().await {
                let _ = outside.send_to(&buf[..n], to).await;
            }
        }
    });
    let both = tokio::spawn(async move {
        let _ = tokio::join!(up, down);
    });
    (counters, both)
}

/// Starts a server that advertises 127.0.0.2 (its "public" address) on its
/// own port, and the relay listening there.
async fn server_behind_nat(
    drop_every: u64,
) -> (Server, Arc<Counters>, tokio::task::JoinHandle<()>) {
    let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = probe.local_addr().unwrap().port();
    drop(probe);
    let server = Server::start_with_args(
        "",
        &[
            "--udp-listen",
            &format!("127.0.0.1:{port}"),
            "--public-address",
            "127.0.0.2",
        ],
    )
    .unwrap();
    let public: SocketAddr = format!("127.0.0.2:{port}").parse().unwrap();
    let inside: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let (counters, relay) = lossy_nat(public, inside, drop_every).await;
    (server, counters, relay)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_packets_are_recovered_through_a_nat_address() {
    let (server, counters, relay) = server_behind_nat(40).await;
    let port = server.udp_port;

    let tmp = tempfile::tempdir().unwrap();
    let report = publish(PublishOpts::sample(
        server.url("/whip/lossy"),
        tmp.path(),
        Duration::from_secs(8),
    ))
    .await
    .unwrap();
    assert!(
        report
            .answer_sdp
            .contains(&format!("127.0.0.2 {port} typ host"))
    );
    let lost = counters.dropped.load(Ordering::Relaxed);
    assert!(lost > 20, "the relay dropped {lost} RTP packets");
    let nacks = counters.nacks.load(Ordering::Relaxed);
    assert!(nacks > 0, "the gateway sent no NACK");

    let playlist = check_hls(
        &server,
        "lossy",
        Expect {
            sent_secs: 8.0,
            codecs: &["h264", "aac"],
            size: Some((640, 360)),
            lip_sync: Some((0.0, 0.1)),
        },
    )
    .await;
    // 2.5 % of RTP lost on the way, yet (almost) every frame arrives: the
    // gateway asked for retransmissions. Without them each loss would cost
    // the rest of its GOP.
    let frames = video_frames(&server.url("/hls/lossy/index.m3u8"));
    assert!(
        frames >= 235,
        "{frames} of 240 frames made it with {lost} RTP packets lost: {playlist:?}"
    );
    relay.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twcc_feedback_reaches_the_publisher() {
    // whipgate publish (str0m) sends transport-wide sequence numbers, as
    // browsers do; the gateway must answer with TWCC feedback so the
    // sender's congestion control can adapt its bitrate.
    let (server, counters, relay) = server_behind_nat(u64::MAX).await;
    let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_whipgate"))
        .arg("publish")
        .arg(support::server::sample_mkv())
        .arg(server.url("/whip/twcc"))
        .args(["--duration", "4"])
        .env("WHIPGATE_LOG", "warn")
        .status();
    let status = tokio::time::timeout(Duration::from_secs(30), status)
        .await
        .expect("publish finished in time")
        .unwrap();
    assert!(status.success());
    let twcc = counters.twcc.load(Ordering::Relaxed);
    assert!(twcc > 10, "{twcc} TWCC feedback packets in 4 s");
    relay.abort();
}

fn video_frames(url: &str) -> usize {
    let out = std::process::Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-select_streams",
            "v:0",
            "-show_entries",
            "packet=pts",
            "-of",
            "csv=p=0",
            url,
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_datagrams_do_not_disturb_a_publication() {
    let server = Server::start("").unwrap();
    let target = format!("127.0.0.1:{}", server.udp_port);
    let noise = tokio::spawn(async move {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for i in 0..20_000u32 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 1400) as usize + 1;
            let mut p: Vec<u8> = (0..len).map(|k| (seed >> (k % 56)) as u8).collect();
            // Every shape the demultiplexer looks at: RTP/RTCP, DTLS, STUN.
            p[0] = [0x80, 0x90, 0x16, 0x00, 0x01, 0xff][i as usize % 6];
            let _ = sock.send_to(&p, &target).await;
            if i % 200 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    let tmp = tempfile::tempdir().unwrap();
    publish(PublishOpts::sample(
        server.url("/whip/noisy"),
        tmp.path(),
        Duration::from_secs(5),
    ))
    .await
    .unwrap();
    noise.await.unwrap();
    check_hls(
        &server,
        "noisy",
        Expect {
            sent_secs: 5.0,
            codecs: &["h264", "aac"],
            size: Some((640, 360)),
            lip_sync: Some((0.0, 0.1)),
        },
    )
    .await;
    let streams = ffprobe_streams(&server.url("/hls/noisy/index.m3u8")).unwrap();
    assert_eq!(streams.len(), 2);
}
