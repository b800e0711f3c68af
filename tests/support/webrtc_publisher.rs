//! An independent WHIP publisher for the integration tests, built on webrtc-rs (`webrtc` 0.21).
//!
//! It publishes an H.264 Annex B elementary stream and an Ogg Opus file to a WHIP endpoint,
//! paced in real time, and reports what happened. Everything is bounded in time: no step can
//! hang the test.
//!
//! webrtc 0.21 is a thin async layer over the sans-I/O `rtc` crate and does not re-export the
//! codec, track-encoding and sample types, so this module names them through `rtc` (which must
//! be a dev-dependency at the same version as the one `webrtc` uses).
#![allow(dead_code)]

use std::future::Future;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use bytes::Bytes;
use rtc::ice::mdns::MulticastDnsMode;
use rtc::ice::network_type::NetworkType;
use rtc::media::Sample;
use rtc::peer_connection::configuration::media_engine::{MIME_TYPE_H264, MIME_TYPE_OPUS};
use rtc::rtp_transceiver::rtp_sender::{
    RTCPFeedback, RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters,
    RTCRtpEncodingParameters, RtpCodecKind,
};
use tokio::sync::watch;
use webrtc::media_stream::MediaStreamTrack;
use webrtc::media_stream::Track;
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_local::static_sample::TrackLocalStaticSample;
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
    RTCConfigurationBuilder, RTCIceGatheringState, RTCPeerConnectionState, RTCSessionDescription,
    Registry, SettingEngineBuilder, register_default_interceptors,
};
use webrtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};

/// Payload type offered for H.264.
pub const H264_PAYLOAD_TYPE: u8 = 102;
/// Payload type offered for Opus.
pub const OPUS_PAYLOAD_TYPE: u8 = 111;
/// fmtp line offered for H.264.
pub const H264_FMTP: &str =
    "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f";

const VIDEO_CLOCK_RATE: u32 = 90_000;
const AUDIO_CLOCK_RATE: u32 = 48_000;
/// 30 fps: 3000 ticks of the 90 kHz clock per frame.
const VIDEO_TICKS_PER_FRAME: u32 = VIDEO_CLOCK_RATE / 30;

const GATHER_TIMEOUT: Duration = Duration::from_secs(5);
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What to publish and where.
#[derive(Debug, Clone)]
pub struct PublishOpts {
    /// WHIP endpoint, e.g. `http://127.0.0.1:8080/whip/test`.
    pub url: String,
    /// Sent as `Authorization: Bearer <token>` on POST and DELETE.
    pub token: Option<String>,
    /// H.264 Annex B elementary stream (30 fps assumed).
    pub h264_annexb: PathBuf,
    /// Ogg Opus file.
    pub ogg_opus: PathBuf,
    /// Stop after this much media, even if the files are longer (files are not looped).
    pub duration: Duration,
    /// Publish a video track.
    pub video: bool,
    /// Publish an audio track.
    pub audio: bool,
    /// Send DELETE to the session URL when done (and require 200).
    pub delete_at_end: bool,
}

/// What happened during a successful publish.
#[derive(Debug, Clone)]
pub struct PublishReport {
    /// Session URL from the `Location` header, resolved against the endpoint URL.
    pub location: String,
    /// `ETag` header of the 201 response, if any.
    pub etag: Option<String>,
    /// Time from sending the POST to receiving the 201.
    pub post_to_201: Duration,
    /// The SDP answer (201 response body).
    pub answer_sdp: String,
    /// Access units written to the video track.
    pub video_frames_sent: u64,
    /// Opus packets written to the audio track.
    pub audio_packets_sent: u64,
    /// Time from receiving the 201 to the peer connection state `Connected`. Always `Some`
    /// in a returned report: not connecting within 10 s is an error.
    pub connected_after: Option<Duration>,
}

/// Extracts `samples/sample.mkv` into `dir/out.h264` (Annex B) and `dir/out.ogg` (Ogg Opus).
pub fn extract_sample(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let input = concat!(env!("CARGO_MANIFEST_DIR"), "/samples/sample.mkv");
    let h264 = dir.join("out.h264");
    let ogg = dir.join("out.ogg");
    run_ffmpeg(&[
        "-v",
        "error",
        "-y",
        "-i",
        input,
        "-map",
        "0:v",
        "-c",
        "copy",
        "-bsf:v",
        "h264_mp4toannexb",
        "-f",
        "h264",
        path_str(&h264)?,
    ])?;
    run_ffmpeg(&[
        "-v",
        "error",
        "-y",
        "-i",
        input,
        "-map",
        "0:a",
        "-c",
        "copy",
        "-f",
        "ogg",
        path_str(&ogg)?,
    ])?;
    Ok((h264, ogg))
}

fn path_str(path: &Path) -> anyhow::Result<&str> {
    path.to_str()
        .ok_or_else(|| anyhow!("non UTF-8 path {}", path.display()))
}

fn run_ffmpeg(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ffmpeg")
        .args(args)
        .output()
        .context("running ffmpeg")?;
    ensure!(
        out.status.success(),
        "ffmpeg {:?} failed ({}): {}",
        args,
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

// ── Media file parsing ────────────────────────────────────────────────────────

/// Splits an Annex B byte stream into NAL units (without start codes).
pub fn split_annexb(data: &[u8]) -> Vec<&[u8]> {
    // Offsets just past each 00 00 01 start code.
    let mut starts = Vec::new();
    let mut i = 0;
    while i + 2 < data.len() {
        if data[i] == 0 && data[i + 1] == 0 && data[i + 2] == 1 {
            starts.push(i + 3);
            i += 3;
        } else {
            i += 1;
        }
    }
    let mut nals = Vec::with_capacity(starts.len());
    for (n, &start) in starts.iter().enumerate() {
        // The next start code begins 3 bytes before the next start offset; trailing zero
        // bytes (the leading zero of a 4-byte start code, trailing_zero_8bits) are not NAL data.
        let mut end = starts.get(n + 1).map_or(data.len(), |&next| next - 3);
        while end > start && data[end - 1] == 0 {
            end -= 1;
        }
        if end > start {
            nals.push(&data[start..end]);
        }
    }
    nals
}

/// Groups NAL units into access units (H.264 7.4.1.2.3), each returned as Annex B bytes
/// (every NAL prefixed with `00 00 00 01`). SPS/PPS/SEI/AUD belong to the following picture;
/// a picture may span several slices (the sample file has two slices per frame).
pub fn h264_access_units(data: &[u8]) -> Vec<Bytes> {
    let mut units = Vec::new();
    let mut current: Vec<u8> = Vec::new();
    let mut current_has_vcl = false;
    for nal in split_annexb(data) {
        let nal_type = nal[0] & 0x1f;
        let is_vcl = (1..=5).contains(&nal_type);
        // first_mb_in_slice is the first ue(v) of the slice header; it is 0 iff its first
        // bit is 1.
        let first_slice_of_picture = is_vcl && nal.get(1).is_some_and(|b| b & 0x80 != 0);
        let starts_new_unit = matches!(nal_type, 6..=9 | 14..=18) || first_slice_of_picture;
        if current_has_vcl && starts_new_unit {
            units.push(Bytes::from(std::mem::take(&mut current)));
            current_has_vcl = false;
        }
        current.extend_from_slice(&[0, 0, 0, 1]);
        current.extend_from_slice(nal);
        current_has_vcl |= is_vcl;
    }
    if current_has_vcl {
        units.push(Bytes::from(current));
    }
    units
}

/// One Opus packet and its duration in 48 kHz samples.
#[derive(Debug, Clone)]
pub struct OpusPacket {
    pub data: Bytes,
    pub samples: u32,
}

/// Duration of an Opus packet in 48 kHz samples, from its TOC byte (RFC 6716 3.1).
pub fn opus_packet_samples(packet: &[u8]) -> Option<u32> {
    let toc = *packet.first()?;
    let config = toc >> 3;
    // Frame size in units of 2.5 ms (120 samples at 48 kHz).
    let frame_units: u32 = match config {
        0..=11 => [4, 8, 16, 24][usize::from(config % 4)],
        12..=15 => [4, 8][usize::from(config % 2)],
        _ => [1, 2, 4, 8][usize::from(config % 4)],
    };
    let frames = match toc & 0x03 {
        0 => 1,
        1 | 2 => 2,
        _ => u32::from(*packet.get(1)? & 0x3f),
    };
    Some(frame_units * 120 * frames)
}

/// Reads the Opus audio packets of the first logical stream of an Ogg file (header packets
/// skipped). Packet durations come from the TOC byte; for a packet whose TOC cannot be read,
/// the page's granule position advance is used instead.
pub fn ogg_opus_packets(data: &[u8]) -> anyhow::Result<Vec<OpusPacket>> {
    let mut packets = Vec::new();
    let mut partial: Vec<u8> = Vec::new();
    let mut serial = None;
    let mut pos = 0;
    let mut packet_index = 0u64;
    let mut last_granule: Option<u64> = None;
    while pos < data.len() {
        let header = data
            .get(pos..pos + 27)
            .ok_or_else(|| anyhow!("truncated Ogg page header at {pos}"))?;
        ensure!(&header[..4] == b"OggS", "bad Ogg capture pattern at {pos}");
        let granule = u64::from_le_bytes(header[6..14].try_into()?);
        let page_serial = u32::from_le_bytes(header[14..18].try_into()?);
        let n_segments = usize::from(header[26]);
        let table = data
            .get(pos + 27..pos + 27 + n_segments)
            .ok_or_else(|| anyhow!("truncated Ogg segment table at {pos}"))?;
        let body_len: usize = table.iter().map(|&l| usize::from(l)).sum();
        let mut body_pos = pos + 27 + n_segments;
        let page_end = body_pos + body_len;
        ensure!(page_end <= data.len(), "truncated Ogg page at {pos}");
        pos = page_end;
        if *serial.get_or_insert(page_serial) != page_serial {
            continue;
        }
        let first_new = packets.len();
        for &lacing in table {
            let lacing = usize::from(lacing);
            partial.extend_from_slice(&data[body_pos..body_pos + lacing]);
            body_pos += lacing;
            if lacing < 255 {
                let packet = std::mem::take(&mut partial);
                packet_index += 1;
                // Packet 1 is OpusHead, packet 2 OpusTags.
                if packet_index <= 2 || packet.starts_with(b"OpusTags") {
                    continue;
                }
                let samples = opus_packet_samples(&packet).unwrap_or(0);
                packets.push(OpusPacket {
                    data: Bytes::from(packet),
                    samples,
                });
            }
        }
        // Fill in unknown durations from the granule position advance of this page.
        if granule != u64::MAX {
            if let Some(last) = last_granule {
                let known: u64 = packets[first_new..]
                    .iter()
                    .map(|p| u64::from(p.samples))
                    .sum();
                let unknown = packets[first_new..]
                    .iter()
                    .filter(|p| p.samples == 0)
                    .count() as u64;
                let advance = granule.saturating_sub(last);
                if unknown > 0 && advance > known {
                    let each = u32::try_from((advance - known) / unknown).unwrap_or(960);
                    for p in packets[first_new..].iter_mut().filter(|p| p.samples == 0) {
                        p.samples = each;
                    }
                }
            }
            if !packets[first_new..].is_empty() || last_granule.is_none() {
                last_granule = Some(granule);
            }
        }
    }
    // Anything still without a duration (no usable granule) is assumed to be 20 ms.
    for p in &mut packets {
        if p.samples == 0 {
            p.samples = 960;
        }
    }
    Ok(packets)
}

/// The smallest duration that webrtc-rs turns back into exactly `ticks` RTP ticks
/// (it computes `(duration.as_secs_f64() * clock_rate) as u32`, which truncates).
fn duration_for_ticks(ticks: u32, clock_rate: u32) -> Duration {
    let nanos = (u64::from(ticks) * 1_000_000_000).div_ceil(u64::from(clock_rate));
    Duration::from_nanos(nanos)
}

// ── WebRTC plumbing ───────────────────────────────────────────────────────────

fn h264_codec() -> RTCRtpCodecParameters {
    let feedback = |typ: &str, parameter: &str| RTCPFeedback {
        typ: typ.to_owned(),
        parameter: parameter.to_owned(),
    };
    RTCRtpCodecParameters {
        rtp_codec: RTCRtpCodec {
            mime_type: MIME_TYPE_H264.to_owned(),
            clock_rate: VIDEO_CLOCK_RATE,
            channels: 0,
            sdp_fmtp_line: H264_FMTP.to_owned(),
            rtcp_feedback: vec![
                feedback("nack", ""),
                feedback("nack", "pli"),
                feedback("ccm", "fir"),
            ],
        },
        payload_type: H264_PAYLOAD_TYPE,
    }
}

fn opus_codec() -> RTCRtpCodecParameters {
    RTCRtpCodecParameters {
        rtp_codec: RTCRtpCodec {
            mime_type: MIME_TYPE_OPUS.to_owned(),
            clock_rate: AUDIO_CLOCK_RATE,
            channels: 2,
            sdp_fmtp_line: "minptime=10;useinbandfec=1".to_owned(),
            rtcp_feedback: vec![],
        },
        payload_type: OPUS_PAYLOAD_TYPE,
    }
}

#[derive(Clone)]
struct Handler {
    gathering: watch::Sender<RTCIceGatheringState>,
    connection: watch::Sender<RTCPeerConnectionState>,
}

// `PeerConnectionEventHandler` is an `#[async_trait]` trait; these are its desugared
// signatures, so that the tests need no `async-trait` dependency.
impl PeerConnectionEventHandler for Handler {
    fn on_ice_gathering_state_change<'life0, 'async_trait>(
        &'life0 self,
        state: RTCIceGatheringState,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        self.gathering.send_replace(state);
        Box::pin(std::future::ready(()))
    }

    fn on_connection_state_change<'life0, 'async_trait>(
        &'life0 self,
        state: RTCPeerConnectionState,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        self.connection.send_replace(state);
        Box::pin(std::future::ready(()))
    }
}

/// A local track being published.
struct Outgoing {
    track: Arc<TrackLocalStaticSample>,
    ssrc: u32,
    payload_type: u8,
}

/// The peer connection with its tracks and state watchers, before signalling.
pub struct Publisher {
    pc: Arc<dyn PeerConnection>,
    video: Option<Outgoing>,
    audio: Option<Outgoing>,
    gathering: watch::Receiver<RTCIceGatheringState>,
    connection: watch::Receiver<RTCPeerConnectionState>,
}

fn new_track(kind: RtpCodecKind, codec: &RTCRtpCodecParameters) -> anyhow::Result<Outgoing> {
    let ssrc = rand::random::<u32>();
    let track = MediaStreamTrack::new(
        "whipgate-test".to_owned(),
        format!("whipgate-test-{kind}"),
        format!("whipgate-test-{kind}"),
        kind,
        vec![RTCRtpEncodingParameters {
            rtp_coding_parameters: RTCRtpCodingParameters {
                ssrc: Some(ssrc),
                ..Default::default()
            },
            active: true,
            codec: codec.rtp_codec.clone(),
            ..Default::default()
        }],
    );
    let track = Arc::new(TrackLocalStaticSample::new(Instant::now(), track)?);
    Ok(Outgoing {
        track,
        ssrc,
        payload_type: codec.payload_type,
    })
}

/// Local UDP addresses to gather host candidates on: loopback always, plus every non-loopback
/// IPv4 interface unless the endpoint itself is on loopback.
fn udp_addrs(url: &url::Url) -> Vec<String> {
    let mut addrs = vec!["127.0.0.1:0".to_owned()];
    let loopback = match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => {
            d == "localhost" || d.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
        }
        None => true,
    };
    if !loopback {
        addrs.push("0.0.0.0:0".to_owned());
    }
    addrs
}

impl Publisher {
    /// Builds the peer connection (H.264 + Opus only, host UDP4 candidates, no mDNS) and adds
    /// a sendonly transceiver per enabled kind.
    pub async fn new(url: &url::Url, video: bool, audio: bool) -> anyhow::Result<Self> {
        ensure!(
            video || audio,
            "nothing to publish: neither video nor audio"
        );
        let mut media_engine = MediaEngine::default();
        media_engine.register_codec(h264_codec(), RtpCodecKind::Video)?;
        media_engine.register_codec(opus_codec(), RtpCodecKind::Audio)?;
        let registry = register_default_interceptors(Registry::new(), &mut media_engine)?;
        let setting_engine = SettingEngineBuilder::new()
            .with_multicast_dns_mode(MulticastDnsMode::Disabled)
            .with_network_types(vec![NetworkType::Udp4])
            .build();

        let (gathering_tx, gathering) = watch::channel(RTCIceGatheringState::New);
        let (connection_tx, connection) = watch::channel(RTCPeerConnectionState::New);
        let handler = Arc::new(Handler {
            gathering: gathering_tx,
            connection: connection_tx,
        });

        let pc = PeerConnectionBuilder::new()
            .with_configuration(RTCConfigurationBuilder::new().build())
            .with_media_engine(media_engine)
            .with_setting_engine(setting_engine)
            .with_interceptor_registry(registry)
            .with_handler(handler)
            .with_udp_addrs(udp_addrs(url))
            .build()
            .await
            .context("building the peer connection")?;
        let mut publisher = Publisher {
            pc: Arc::new(pc),
            video: None,
            audio: None,
            gathering,
            connection,
        };
        if let Err(err) = publisher.add_tracks(video, audio).await {
            publisher.close().await;
            return Err(err);
        }
        Ok(publisher)
    }

    async fn add_tracks(&mut self, video: bool, audio: bool) -> anyhow::Result<()> {
        for (enabled, kind, codec) in [
            (video, RtpCodecKind::Video, h264_codec()),
            (audio, RtpCodecKind::Audio, opus_codec()),
        ] {
            if !enabled {
                continue;
            }
            let mut outgoing = new_track(kind, &codec)?;
            self.pc
                .add_transceiver_from_track(
                    Arc::clone(&outgoing.track) as Arc<dyn TrackLocal>,
                    Some(RTCRtpTransceiverInit {
                        direction: RTCRtpTransceiverDirection::Sendonly,
                        streams: vec!["whipgate-test".to_owned()],
                        send_encodings: vec![],
                    }),
                )
                .await
                .with_context(|| format!("adding the {kind} transceiver"))?;
            // The track's own SSRC is authoritative; double-check it survived.
            if let Some(&ssrc) = outgoing.track.ssrcs().await.first() {
                outgoing.ssrc = ssrc;
            }
            match kind {
                RtpCodecKind::Video => self.video = Some(outgoing),
                _ => self.audio = Some(outgoing),
            }
        }
        Ok(())
    }

    /// Creates the offer, waits (bounded) for ICE gathering to complete and returns the
    /// complete local SDP.
    pub async fn offer(&mut self) -> anyhow::Result<String> {
        let offer = self.pc.create_offer(None).await?;
        self.pc.set_local_description(offer).await?;
        tokio::time::timeout(
            GATHER_TIMEOUT,
            self.gathering
                .wait_for(|s| *s == RTCIceGatheringState::Complete),
        )
        .await
        .map_err(|_| anyhow!("ICE gathering did not complete within {GATHER_TIMEOUT:?}"))?
        .map_err(|_| anyhow!("peer connection dropped while gathering"))?;
        let local = self
            .pc
            .local_description()
            .await
            .ok_or_else(|| anyhow!("no local description after gathering"))?;
        Ok(local.sdp)
    }

    /// Applies the answer and waits (bounded) for the `Connected` state; returns how long it
    /// took.
    pub async fn connect(&mut self, answer_sdp: &str) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let answer = RTCSessionDescription::answer(answer_sdp.to_owned())?;
        self.pc
            .set_remote_description(answer)
            .await
            .context("setting the SDP answer")?;
        let waited = tokio::time::timeout(
            CONNECT_TIMEOUT,
            self.connection.wait_for(|s| {
                matches!(
                    s,
                    RTCPeerConnectionState::Connected
                        | RTCPeerConnectionState::Failed
                        | RTCPeerConnectionState::Closed
                )
            }),
        )
        .await
        .map(|r| r.map(|state| *state));
        let reached = match waited {
            Ok(Ok(state)) => state,
            Ok(Err(_)) => bail!("peer connection dropped while connecting"),
            Err(_) => bail!(
                "peer connection not connected within {CONNECT_TIMEOUT:?} (state: {})",
                *self.connection.borrow()
            ),
        };
        ensure!(
            reached == RTCPeerConnectionState::Connected,
            "peer connection {reached} instead of connected"
        );
        Ok(started.elapsed())
    }

    /// Resolves the payload type the answer negotiated for a sender (falling back to ours).
    async fn negotiate_payload_types(&mut self) -> anyhow::Result<()> {
        for sender in self.pc.get_senders().await {
            let params = sender.get_parameters().await?;
            let kind = sender.track().kind().await;
            let (outgoing, mime) = match kind {
                RtpCodecKind::Video => (self.video.as_mut(), MIME_TYPE_H264),
                RtpCodecKind::Audio => (self.audio.as_mut(), MIME_TYPE_OPUS),
                _ => continue,
            };
            if let (Some(outgoing), Some(codec)) = (
                outgoing,
                params
                    .rtp_parameters
                    .codecs
                    .iter()
                    .find(|c| c.rtp_codec.mime_type.eq_ignore_ascii_case(mime)),
            ) {
                outgoing.payload_type = codec.payload_type;
            }
        }
        Ok(())
    }

    /// Sends the media, paced in real time, for at most `limit` of media time. Returns
    /// (video frames, audio packets) sent.
    async fn stream(
        &mut self,
        video: &[Bytes],
        audio: &[OpusPacket],
        limit: Duration,
    ) -> anyhow::Result<(u64, u64)> {
        self.negotiate_payload_types().await?;
        let frame_duration = duration_for_ticks(VIDEO_TICKS_PER_FRAME, VIDEO_CLOCK_RATE);
        let video = if self.video.is_some() { video } else { &[] };
        let audio = if self.audio.is_some() { audio } else { &[] };
        let (mut vi, mut ai) = (0usize, 0usize);
        // Media time of the next audio packet, in 48 kHz samples.
        let mut audio_samples: u64 = 0;
        let start = tokio::time::Instant::now();
        loop {
            // Media times of the next pending units, if still within the limit.
            let next_video = video
                .get(vi)
                .map(|_| Duration::from_nanos(vi as u64 * 1_000_000_000 / 30))
                .filter(|t| *t < limit);
            let next_audio = audio
                .get(ai)
                .map(|_| Duration::from_nanos(audio_samples * 1_000_000_000 / 48_000))
                .filter(|t| *t < limit);
            let send_video = match (next_video, next_audio) {
                (None, None) => break,
                (Some(v), Some(a)) => v <= a,
                (Some(_), None) => true,
                (None, Some(_)) => false,
            };
            let due = if send_video { next_video } else { next_audio };
            tokio::time::sleep_until(start + due.unwrap_or_default()).await;

            let state = *self.connection.borrow();
            if matches!(
                state,
                RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed
            ) {
                bail!("peer connection {state} while streaming");
            }

            let (outgoing, data, duration, what) = if send_video {
                let data = video[vi].clone();
                vi += 1;
                (self.video.as_ref(), data, frame_duration, "video frame")
            } else {
                let packet = &audio[ai];
                ai += 1;
                audio_samples += u64::from(packet.samples);
                let duration = duration_for_ticks(packet.samples, AUDIO_CLOCK_RATE);
                (
                    self.audio.as_ref(),
                    packet.data.clone(),
                    duration,
                    "audio packet",
                )
            };
            let Some(outgoing) = outgoing else { continue };
            let sample = Sample {
                data,
                duration,
                ..Sample::new(Instant::now())
            };
            tokio::time::timeout(
                WRITE_TIMEOUT,
                outgoing
                    .track
                    .sample_writer(outgoing.ssrc, outgoing.payload_type)
                    .write_sample(&sample),
            )
            .await
            .map_err(|_| anyhow!("writing a {what} timed out"))?
            .with_context(|| format!("writing a {what}"))?;
        }
        Ok((vi as u64, ai as u64))
    }

    /// Closes the peer connection (bounded, best effort).
    pub async fn close(&self) {
        match tokio::time::timeout(CLOSE_TIMEOUT, self.pc.close()).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => eprintln!("webrtc_publisher: closing the peer connection: {err}"),
            Err(_) => eprintln!("webrtc_publisher: closing the peer connection timed out"),
        }
    }
}

// ── WHIP ──────────────────────────────────────────────────────────────────────

fn http_client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .timeout(HTTP_TIMEOUT)
        .no_proxy()
        .build()?)
}

fn with_token(req: reqwest::RequestBuilder, token: Option<&str>) -> reqwest::RequestBuilder {
    match token {
        Some(token) => req.bearer_auth(token),
        None => req,
    }
}

/// The parts of a WHIP 201 response.
#[derive(Debug, Clone)]
pub struct WhipSession {
    pub location: String,
    pub etag: Option<String>,
    pub answer_sdp: String,
}

/// POSTs an SDP offer; requires 201 and returns the answer, the resolved Location and ETag.
pub async fn whip_post(
    client: &reqwest::Client,
    url: &url::Url,
    token: Option<&str>,
    offer_sdp: &str,
) -> anyhow::Result<WhipSession> {
    let resp = with_token(client.post(url.clone()), token)
        .header(reqwest::header::CONTENT_TYPE, "application/sdp")
        .body(offer_sdp.to_owned())
        .send()
        .await
        .with_context(|| format!("WHIP POST {url}"))?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.text().await.unwrap_or_default();
    if status != reqwest::StatusCode::CREATED {
        bail!("WHIP POST {url} answered {status} (expected 201 Created): {body}");
    }
    let location = headers
        .get(reqwest::header::LOCATION)
        .ok_or_else(|| anyhow!("WHIP POST {url}: 201 without a Location header"))?
        .to_str()
        .context("Location header is not ASCII")?;
    let location = url
        .join(location)
        .with_context(|| format!("resolving Location {location:?} against {url}"))?
        .to_string();
    let etag = headers
        .get(reqwest::header::ETAG)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    Ok(WhipSession {
        location,
        etag,
        answer_sdp: body,
    })
}

/// DELETEs a WHIP session; requires 200.
pub async fn whip_delete(
    client: &reqwest::Client,
    location: &str,
    token: Option<&str>,
) -> anyhow::Result<()> {
    let resp = with_token(client.delete(location), token)
        .send()
        .await
        .with_context(|| format!("WHIP DELETE {location}"))?;
    let status = resp.status();
    if status != reqwest::StatusCode::OK {
        let body = resp.text().await.unwrap_or_default();
        bail!("WHIP DELETE {location} answered {status} (expected 200 OK): {body}");
    }
    Ok(())
}

/// Publishes the files to the WHIP endpoint in real time; see [`PublishOpts`].
///
/// Fails if the POST is not answered 201 (the error contains status and body), if the peer
/// connection does not connect within 10 s, if sending fails, or if the final DELETE (when
/// requested) is not answered 200. The peer connection is closed in every case.
pub async fn publish(opts: PublishOpts) -> anyhow::Result<PublishReport> {
    let url = url::Url::parse(&opts.url).with_context(|| format!("parsing {}", opts.url))?;
    let video = if opts.video {
        let data = tokio::fs::read(&opts.h264_annexb)
            .await
            .with_context(|| format!("reading {}", opts.h264_annexb.display()))?;
        let units = h264_access_units(&data);
        ensure!(
            !units.is_empty(),
            "no H.264 access units in {}",
            opts.h264_annexb.display()
        );
        units
    } else {
        Vec::new()
    };
    let audio = if opts.audio {
        let data = tokio::fs::read(&opts.ogg_opus)
            .await
            .with_context(|| format!("reading {}", opts.ogg_opus.display()))?;
        let packets = ogg_opus_packets(&data)
            .with_context(|| format!("parsing {}", opts.ogg_opus.display()))?;
        ensure!(
            !packets.is_empty(),
            "no Opus packets in {}",
            opts.ogg_opus.display()
        );
        packets
    } else {
        Vec::new()
    };
    let client = http_client()?;

    let mut publisher = Publisher::new(&url, opts.video, opts.audio).await?;
    let mut location = None;
    let result = run(
        &mut publisher,
        &client,
        &url,
        &opts,
        &video,
        &audio,
        &mut location,
    )
    .await;
    if result.is_err() && opts.delete_at_end {
        // Best effort: do not leave a session behind on the server.
        if let Some(location) = &location {
            let _ = whip_delete(&client, location, opts.token.as_deref()).await;
        }
    }
    publisher.close().await;
    result
}

async fn run(
    publisher: &mut Publisher,
    client: &reqwest::Client,
    url: &url::Url,
    opts: &PublishOpts,
    video: &[Bytes],
    audio: &[OpusPacket],
    location_out: &mut Option<String>,
) -> anyhow::Result<PublishReport> {
    let offer = publisher.offer().await?;
    let posted = Instant::now();
    let session = whip_post(client, url, opts.token.as_deref(), &offer).await?;
    let post_to_201 = posted.elapsed();
    *location_out = Some(session.location.clone());

    let connected_after = publisher.connect(&session.answer_sdp).await?;
    let (video_frames_sent, audio_packets_sent) =
        publisher.stream(video, audio, opts.duration).await?;

    if opts.delete_at_end {
        whip_delete(client, &session.location, opts.token.as_deref()).await?;
        *location_out = None;
    }
    Ok(PublishReport {
        location: session.location,
        etag: session.etag,
        post_to_201,
        answer_sdp: session.answer_sdp,
        video_frames_sent,
        audio_packets_sent,
        connected_after: Some(connected_after),
    })
}
