//! Prometheus metrics. The recorder is installed once per process, by
//! whoever needs it first (the router, a hub, the WebRTC driver), so no
//! metric is registered with the no-op recorder. Hot paths keep [`Counter`]
//! handles: an increment is one atomic add, no lookup by name. Per-frame
//! counts go through a [`Tally`], which adds to the counter about once a
//! second.

use std::sync::{LazyLock, OnceLock};

use metrics::{Counter, Unit, counter, describe_counter, describe_gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::media::frame::Codec;

pub const SESSIONS_ACTIVE: &str = "whipgate_sessions_active";
pub const STREAMS_LIVE: &str = "whipgate_streams_live";
pub const HTTP_REQUESTS: &str = "whipgate_http_requests_total";
const SESSIONS_CREATED: &str = "whipgate_sessions_created_total";
const BYTES_IN: &str = "whipgate_bytes_in_total";
const PACKETS_IN: &str = "whipgate_packets_in_total";
const KEYFRAME_REQUESTS: &str = "whipgate_keyframe_requests_total";
const PACKETS_DROPPED: &str = "whipgate_packets_dropped_total";
const MEDIA_DROPPED: &str = "whipgate_media_dropped_total";
const NACKS_SENT: &str = "whipgate_nacks_sent_total";
const PACKET_LOSS: &str = "whipgate_packet_loss_ratio";
const TRANSCODE_LAG: &str = "whipgate_transcode_lag_seconds";
const ICE_RESTARTS: &str = "whipgate_ice_restarts_total";
const RATE_LIMITED: &str = "whipgate_http_rate_limited_total";
const REDIRECTS: &str = "whipgate_whip_redirects_total";
const HLS_SEGMENTS: &str = "whipgate_hls_segments_total";
const PUSH_RECONNECTS: &str = "whipgate_push_reconnects_total";
const PUSH_BYTES: &str = "whipgate_push_bytes_total";
const FRAMES_PUBLISHED: &str = "whipgate_frames_published_total";
const FRAMES_DROPPED: &str = "whipgate_frames_dropped_total";
const FRAMES_DELIVERED: &str = "whipgate_frames_delivered_total";
const STORAGE_RETRIES: &str = "whipgate_storage_retries_total";
const STORAGE_ERRORS: &str = "whipgate_storage_errors_total";
const STORAGE_DROPPED: &str = "whipgate_storage_dropped_total";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's Prometheus handle, installing the recorder on first use.
/// Should another recorder be installed already (a test harness), metrics
/// go there and `/metrics` shows only the process metrics.
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let handle = match PrometheusBuilder::new().install_recorder() {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "a metrics recorder is installed already");
                PrometheusBuilder::new().build_recorder().handle()
            }
        };
        describe();
        handle
    })
}

fn describe() {
    describe_gauge!(SESSIONS_ACTIVE, "WebRTC publishing sessions open now");
    describe_gauge!(STREAMS_LIVE, "Streams with a publisher now");
    describe_counter!(SESSIONS_CREATED, "WebRTC publishing sessions created");
    describe_counter!(
        BYTES_IN,
        Unit::Bytes,
        "UDP bytes received by the WebRTC driver"
    );
    describe_counter!(PACKETS_IN, "UDP datagrams received by the WebRTC driver");
    describe_counter!(
        KEYFRAME_REQUESTS,
        "Keyframe requests (PLI or FIR) sent to publishers"
    );
    describe_counter!(
        PACKETS_DROPPED,
        "Datagrams and ICE-TCP frames dropped before any session, by reason"
    );
    describe_counter!(
        MEDIA_DROPPED,
        "Media frames of publishers dropped at ingest, by reason"
    );
    describe_counter!(NACKS_SENT, "NACKs sent to publishers for lost packets");
    describe_gauge!(
        PACKET_LOSS,
        "Fraction of the publisher's RTP packets lost, per stream (last report)"
    );
    describe_gauge!(
        TRANSCODE_LAG,
        Unit::Seconds,
        "Time the last frame waited in a transcoder's queue"
    );
    describe_counter!(ICE_RESTARTS, "ICE restarts asked by publishers");
    describe_counter!(
        RATE_LIMITED,
        "WHIP requests refused with 429 by the per-IP rate limit"
    );
    describe_counter!(
        REDIRECTS,
        "WHIP offers sent to another node with 307 (redirect mode)"
    );
    describe_counter!(HLS_SEGMENTS, "HLS segments written");
    describe_counter!(
        PUSH_RECONNECTS,
        "RTMP push connection attempts after a failure"
    );
    describe_counter!(
        PUSH_BYTES,
        Unit::Bytes,
        "Bytes written to RTMP push targets"
    );
    describe_counter!(FRAMES_PUBLISHED, "Frames published on a stream's hub");
    describe_counter!(
        FRAMES_DROPPED,
        "Frames a reader of a stream lost, by reason"
    );
    describe_counter!(
        FRAMES_DELIVERED,
        "Frames handed to each reader (output) of a stream"
    );
    describe_counter!(HTTP_REQUESTS, "HTTP requests by matched route and status");
    describe_counter!(
        STORAGE_RETRIES,
        "HLS storage operations tried again after a failure, by backend and operation"
    );
    describe_counter!(
        STORAGE_ERRORS,
        "HLS storage operations given up after every retry failed, by backend and operation"
    );
    describe_counter!(
        STORAGE_DROPPED,
        "HLS storage operations dropped unattempted because the output's queue was full"
    );
}

/// Process-wide counters without labels.
pub struct Counters {
    pub sessions_created: Counter,
    pub bytes_in: Counter,
    pub packets_in: Counter,
    pub keyframe_requests: Counter,
    pub nacks_sent: Counter,
    pub ice_restarts: Counter,
    pub rate_limited: Counter,
    pub redirects: Counter,
    pub hls_segments: Counter,
    pub push_reconnects: Counter,
    pub push_bytes: Counter,
}

pub fn counters() -> &'static Counters {
    static COUNTERS: LazyLock<Counters> = LazyLock::new(|| {
        handle();
        Counters {
            sessions_created: counter!(SESSIONS_CREATED),
            bytes_in: counter!(BYTES_IN),
            packets_in: counter!(PACKETS_IN),
            keyframe_requests: counter!(KEYFRAME_REQUESTS),
            nacks_sent: counter!(NACKS_SENT),
            ice_restarts: counter!(ICE_RESTARTS),
            rate_limited: counter!(RATE_LIMITED),
            redirects: counter!(REDIRECTS),
            hls_segments: counter!(HLS_SEGMENTS),
            push_reconnects: counter!(PUSH_RECONNECTS),
            push_bytes: counter!(PUSH_BYTES),
        }
    });
    &COUNTERS
}

/// Why a packet was dropped before reaching a session.
#[derive(Debug, Clone, Copy)]
pub enum PacketDrop {
    /// Neither STUN, DTLS, RTP nor RTCP, or longer than the driver reads
    /// (2048 bytes).
    Unparsable,
    /// No session accepts it (unknown ICE credentials or sender).
    NoSession,
    /// The session refused it (bad SRTP, bad DTLS, impossible RTP).
    Rejected,
}

pub fn packet_dropped(why: PacketDrop) {
    static C: LazyLock<[Counter; 3]> = LazyLock::new(|| {
        handle();
        ["unparsable", "no_session", "rejected"]
            .map(|reason| counter!(PACKETS_DROPPED, "reason" => reason))
    });
    C[why as usize].increment(1);
}

/// Why ingest dropped publisher media.
#[derive(Debug, Clone, Copy)]
pub enum MediaDrop {
    /// Video before the first keyframe or after a loss, until the next one.
    WaitingKeyframe,
    /// An SPS or PPS that does not parse (ignored).
    BadParameterSet,
    /// RTP timestamps that cannot be placed on the stream timeline.
    Timestamp,
}

pub fn media_dropped(why: MediaDrop, n: u64) {
    static C: LazyLock<[Counter; 3]> = LazyLock::new(|| {
        handle();
        ["waiting_keyframe", "bad_parameter_set", "timestamp"]
            .map(|reason| counter!(MEDIA_DROPPED, "reason" => reason))
    });
    C[why as usize].increment(n);
}

/// The publisher's packet loss on `stream`.
pub fn packet_loss(stream: &str, loss: f32) {
    handle();
    metrics::gauge!(PACKET_LOSS, "stream" => stream.to_owned()).set(f64::from(loss));
}

/// How long frames wait in the queue of `transcoder` on `stream`.
pub fn transcode_lag(stream: &str, transcoder: &'static str) -> metrics::Gauge {
    handle();
    metrics::gauge!(TRANSCODE_LAG, "stream" => stream.to_owned(), "transcoder" => transcoder)
}

pub fn codec_name(codec: Codec) -> &'static str {
    match codec {
        Codec::H264 => "h264",
        Codec::Opus => "opus",
        Codec::Aac => "aac",
        Codec::Vp8 => "vp8",
        Codec::Vp9 => "vp9",
        Codec::Av1 => "av1",
    }
}

/// A [`Counter`] on a per-frame path: counts in a plain integer, and adds
/// the sum to the counter when [`Tally::flush`]ed (the hub does about once
/// a second) and when dropped. A counter handle is two atomics in memory of
/// their own, no longer in the cache by a stream's next frame: at 100
/// streams, the hub's three increments per frame took 2% of the server's
/// CPU.
pub struct Tally {
    counter: Counter,
    pending: u64,
}

impl Tally {
    pub fn new(counter: Counter) -> Self {
        Self {
            counter,
            pending: 0,
        }
    }

    pub fn add(&mut self, n: u64) {
        self.pending += n;
    }

    pub fn flush(&mut self) {
        if self.pending > 0 {
            self.counter.increment(std::mem::take(&mut self.pending));
        }
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Frames of `codec` published on `stream`.
pub fn frames_published(stream: &str, codec: Codec) -> Counter {
    handle();
    counter!(FRAMES_PUBLISHED, "stream" => stream.to_owned(), "codec" => codec_name(codec))
}

/// Frames handed to the reader `reader` of `stream`.
pub fn frames_delivered(stream: &str, reader: &'static str) -> Counter {
    handle();
    counter!(FRAMES_DELIVERED, "stream" => stream.to_owned(), "reader" => reader)
}

/// Frames the reader `reader` of `stream` lost for `reason`.
pub fn frames_dropped(stream: &str, reader: &'static str, reason: &'static str) -> Counter {
    handle();
    counter!(FRAMES_DROPPED, "stream" => stream.to_owned(), "reader" => reader, "reason" => reason)
}

/// Failed HLS storage operations `op` (`put`, `delete`, `clear`) of
/// `backend` (`local`, `memory`, `s3`) that are tried again.
pub fn storage_retries(backend: &'static str, op: &'static str) -> Counter {
    handle();
    counter!(STORAGE_RETRIES, "backend" => backend, "op" => op)
}

/// HLS storage operations given up after their last retry.
pub fn storage_errors(backend: &'static str, op: &'static str) -> Counter {
    handle();
    counter!(STORAGE_ERRORS, "backend" => backend, "op" => op)
}

/// HLS storage operations dropped before any try: the queue was full.
pub fn storage_dropped(backend: &'static str) -> Counter {
    handle();
    counter!(STORAGE_DROPPED, "backend" => backend)
}

/// The exposition text: the recorder's metrics, then the process's CPU time
/// and resident memory read now from `/proc`.
pub fn render() -> String {
    let mut text = handle().render();
    if let Some(cpu) = process_cpu_seconds() {
        text.push_str(&format!(
            "# HELP whipgate_process_cpu_seconds_total User and system CPU time of the process\n\
             # TYPE whipgate_process_cpu_seconds_total counter\n\
             whipgate_process_cpu_seconds_total {cpu}\n"
        ));
    }
    if let Some(rss) = process_resident_bytes() {
        text.push_str(&format!(
            "# HELP whipgate_process_resident_memory_bytes Resident memory of the process\n\
             # TYPE whipgate_process_resident_memory_bytes gauge\n\
             whipgate_process_resident_memory_bytes {rss}\n"
        ));
    }
    text
}

/// Clock ticks per second of `/proc` times (USER_HZ, 100 on Linux).
const CLOCK_TICKS: f64 = 100.0;

fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    parse_cpu_ticks(&stat).map(|t| t as f64 / CLOCK_TICKS)
}

/// utime + stime (fields 14 and 15) of a `/proc/PID/stat` line. The command
/// name (field 2) may hold spaces and parentheses: fields are counted from
/// the last `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

fn process_resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_rss(&status)
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line
        .trim_start_matches("VmRSS:")
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_parse() {
        let stat = "1234 (a (b) c) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0";
        assert_eq!(parse_cpu_ticks(stat), Some(300));
        let status = "Name:\twhipgate\nVmPeak:\t  9000 kB\nVmRSS:\t    4096 kB\n";
        assert_eq!(parse_vm_rss(status), Some(4096 * 1024));
        assert!(process_resident_bytes().unwrap_or(1) > 0);
    }

    #[test]
    fn render_has_counters_and_process_metrics() {
        counters().hls_segments.increment(1);
        frames_published("unit", Codec::H264).increment(2);
        let text = render();
        assert!(text.contains("whipgate_hls_segments_total"), "{text}");
        assert!(
            text.contains(r#"whipgate_frames_published_total{stream="unit",codec="h264"} 2"#),
            "{text}"
        );
        if cfg!(target_os = "linux") {
            assert!(text.contains("whipgate_process_resident_memory_bytes "));
            assert!(text.contains("whipgate_process_cpu_seconds_total "));
        }
    }

    #[test]
    fn a_tally_reaches_its_counter_when_flushed_and_when_dropped() {
        let line = |n: u32| {
            format!(r#"whipgate_frames_delivered_total{{stream="tally",reader="unit"}} {n}"#)
        };
        let mut tally = Tally::new(frames_delivered("tally", "unit"));
        tally.add(3);
        assert!(!render().contains(&line(3)), "not before the flush");
        tally.flush();
        assert!(render().contains(&line(3)));
        tally.flush();
        tally.add(2);
        drop(tally);
        assert!(render().contains(&line(5)), "{}", render());
    }
}
