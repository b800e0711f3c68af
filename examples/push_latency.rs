//! Delay from a frame arriving at the hub to its RTMP message leaving the
//! gateway, measured end to end against an in-process RTMP server.
//!
//! A minimal rml_rtmp server (its own thread, blocking I/O) listens on
//! 127.0.0.1, accepts `connect` and `publish`, and records when each audio or
//! video message has been fully received, keyed by its RTMP timestamp. A hub
//! pushes to it while the sample's real frames (H264 copied, audio encoded to
//! AAC by the ffmpeg CLI) are published into the hub in real time; each
//! frame's publish time is recorded under its timestamp in ms.
//!
//!     cargo run --release --example push_latency

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use rml_rtmp::handshake::{Handshake, HandshakeProcessResult, PeerType};
use rml_rtmp::sessions::{
    ServerSession, ServerSessionConfig, ServerSessionEvent, ServerSessionResult,
};
use tokio::sync::watch;
#[path = "../tests/support/sample_frames.rs"]
mod sample_frames;

use sample_frames::load_sample_frames;
use whipgate::hub::{Hub, Publication};
use whipgate::media::frame::TrackKind;
use whipgate::rtmp::flv::timestamp_ms;
use whipgate::rtmp::push::{self, PushOptions, PushState};
use whipgate::rtmp::target::Target;

/// Everything the server thread does must end within this.
const SERVER_LIMIT: Duration = Duration::from_secs(60);
/// Time given to the push to end the publication after the publisher left.
const END_LIMIT: Duration = Duration::from_secs(10);

const PUBLICATION: Publication = Publication {
    id: 1,
    video: true,
    audio: true,
};

/// A frame (or RTMP message) of one track at one timestamp in ms.
type Key = (bool, u32);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let frames = load_sample_frames().context("loading samples/sample.mkv")?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let server = std::thread::spawn(move || serve(listener, Instant::now() + SERVER_LIMIT));

    let hub = Hub::new("bench");
    let target = Target::parse(&format!("rtmp://127.0.0.1:{port}/live/bench"))?;
    let (_shutdown_tx, shutdown) = watch::channel(false);
    let handle = push::spawn(hub.clone(), target, PushOptions::default(), shutdown);

    hub.start(PUBLICATION, Box::new(|| {}));
    let mut published: HashMap<Key, Instant> = HashMap::new();
    let began = tokio::time::Instant::now();
    for f in &frames {
        let due = Duration::from_secs_f64(f.dts as f64 / 90_000.0);
        tokio::time::sleep_until(began + due).await;
        let video = f.codec().kind() == TrackKind::Video;
        published
            .entry((video, timestamp_ms(f.dts)))
            .or_insert_with(Instant::now);
        hub.publish(PUBLICATION, f.clone());
    }
    hub.stop(PUBLICATION.id);

    let deadline = Instant::now() + END_LIMIT;
    while handle.stats().state != PushState::Idle {
        ensure!(
            Instant::now() < deadline,
            "the push did not end: {:?}",
            handle.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = handle.stats();
    tokio::time::timeout(END_LIMIT, handle.stopped())
        .await
        .context("stopping the push")?;
    let received = server
        .join()
        .map_err(|_| anyhow::anyhow!("the RTMP server thread panicked"))??;

    report(
        &published,
        &received,
        stats.frames_dropped,
        stats.reconnects,
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------

fn report(published: &HashMap<Key, Instant>, received: &Received, dropped: u64, reconnects: u64) {
    println!("hub publish -> RTMP message fully received by a local rml_rtmp server");
    println!(
        "samples/sample.mkv ({} frames published in real time), push frames_dropped {dropped}, reconnects {reconnects}",
        published.len()
    );
    println!(
        "{:<34} {:>6} {:>8} {:>8} {:>8} {:>8}",
        "", "count", "p50 ms", "p95 ms", "p99 ms", "max ms"
    );
    for (video, name) in [(true, "video"), (false, "audio")] {
        let mut steady = Vec::new();
        let mut startup = Vec::new();
        for (&(v, ts), &at) in &received.arrivals {
            let Some(&sent) = published.get(&(v, ts)) else {
                continue;
            };
            if v != video {
                continue;
            }
            let ms = at.saturating_duration_since(sent).as_secs_f64() * 1000.0;
            // Frames published before the server accepted `publish` waited
            // for the connection (GOP cache) and go out in one burst.
            if sent >= received.publishing_at {
                steady.push(ms);
            } else {
                startup.push(ms);
            }
        }
        let total = published.keys().filter(|k| k.0 == video).count();
        let matched = steady.len() + startup.len();
        print_row(&format!("{name} (published while live)"), steady);
        print_row(&format!("{name} (published while connecting)"), startup);
        println!("  {name}: {matched} of {total} published frames matched a received message");
    }
    println!(
        "note: includes the hub queue, the push task (FLV/RTMP muxing, chunking), loopback TCP \
         and the receiver's read + rml_rtmp parsing; the receiver runs on its own thread."
    );
}

fn print_row(label: &str, mut ms: Vec<f64>) {
    ms.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        let rank = ((p * ms.len() as f64).ceil() as usize).clamp(1, ms.len());
        ms[rank - 1]
    };
    if ms.is_empty() {
        println!("{label:<34} {:>6}", 0);
    } else {
        println!(
            "{label:<34} {:>6} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
            ms.len(),
            pct(0.50),
            pct(0.95),
            pct(0.99),
            ms[ms.len() - 1]
        );
    }
}

// ---------------------------------------------------------------------------
// The RTMP server
// ---------------------------------------------------------------------------

struct Received {
    /// When each audio/video message (sequence headers excluded) was fully
    /// received and parsed, first one per key.
    arrivals: HashMap<Key, Instant>,
    /// When the server accepted `publish`.
    publishing_at: Instant,
}

/// Serves one publisher until it disconnects or `deadline`.
fn serve(listener: TcpListener, deadline: Instant) -> anyhow::Result<Received> {
    let mut socket = accept(&listener, deadline)?;
    socket.set_nodelay(true)?;
    socket.set_read_timeout(Some(Duration::from_millis(100)))?;
    let mut handshake = Some(Handshake::new(PeerType::Server));
    let mut session: Option<ServerSession> = None;
    let mut received = Received {
        arrivals: HashMap::new(),
        publishing_at: deadline,
    };
    let mut buf = vec![0u8; 64 * 1024];
    while Instant::now() < deadline {
        let n = match socket.read(&mut buf) {
            Ok(0) => return Ok(received),
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) => return Err(e).context("reading from the push"),
        };
        let mut input = buf[..n].to_vec();
        if let Some(h) = handshake.as_mut() {
            match h.process_bytes(&input)? {
                HandshakeProcessResult::InProgress { response_bytes } => {
                    socket.write_all(&response_bytes)?;
                    continue;
                }
                HandshakeProcessResult::Completed {
                    response_bytes,
                    remaining_bytes,
                } => {
                    socket.write_all(&response_bytes)?;
                    handshake = None;
                    let (s, results) = ServerSession::new(ServerSessionConfig::new())?;
                    session = Some(s);
                    let s = session.as_mut().context("session")?;
                    handle(s, results, &mut socket, &mut received)?;
                    input = remaining_bytes;
                }
            }
        }
        if input.is_empty() {
            continue;
        }
        let s = session.as_mut().context("session")?;
        let results = s.handle_input(&input)?;
        handle(s, results, &mut socket, &mut received)?;
    }
    bail!("the RTMP server ran out of time ({SERVER_LIMIT:?})")
}

fn accept(listener: &TcpListener, deadline: Instant) -> anyhow::Result<TcpStream> {
    listener.set_nonblocking(true)?;
    loop {
        match listener.accept() {
            Ok((socket, _)) => {
                socket.set_nonblocking(false)?;
                return Ok(socket);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                ensure!(Instant::now() < deadline, "the push never connected");
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e).context("accepting"),
        }
    }
}

/// Writes responses, accepts `connect` and `publish`, records media arrivals.
fn handle(
    session: &mut ServerSession,
    results: Vec<ServerSessionResult>,
    socket: &mut TcpStream,
    received: &mut Received,
) -> anyhow::Result<()> {
    let now = Instant::now();
    for r in results {
        let event = match r {
            ServerSessionResult::OutboundResponse(p) => {
                socket.write_all(&p.bytes)?;
                continue;
            }
            ServerSessionResult::RaisedEvent(e) => e,
            ServerSessionResult::UnhandleableMessageReceived(_) => continue,
        };
        let (video, data, timestamp) = match event {
            ServerSessionEvent::ConnectionRequested { request_id, .. } => {
                let more = session.accept_request(request_id)?;
                handle(session, more, socket, received)?;
                continue;
            }
            ServerSessionEvent::PublishStreamRequested { request_id, .. } => {
                received.publishing_at = Instant::now();
                let more = session.accept_request(request_id)?;
                handle(session, more, socket, received)?;
                continue;
            }
            ServerSessionEvent::VideoDataReceived {
                data, timestamp, ..
            } => (true, data, timestamp),
            ServerSessionEvent::AudioDataReceived {
                data, timestamp, ..
            } => (false, data, timestamp),
            _ => continue,
        };
        // Byte 1 is the AVC/AAC packet type: 0 is a sequence header.
        if data.get(1).is_some_and(|&t| t != 0) {
            received
                .arrivals
                .entry((video, timestamp.value))
                .or_insert(now);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Media (as in tests/rtmp_push.rs)
// ---------------------------------------------------------------------------
