//! The sample's frames as the hub carries them, without WebRTC: its H264 as
//! Annex B access units (split by `H264Assembler`, the code the WebRTC ingest
//! uses) and its audio encoded to AAC by the ffmpeg CLI (ADTS stripped), on
//! the stream timeline in decode order. Shared by tests/rtmp_push.rs and
//! examples/push_latency.rs (which includes this file by path).
#![allow(dead_code)]

use std::sync::Arc;

use anyhow::{Context, ensure};
use bytes::Bytes;
use whipgate::media::frame::{CodecParams, Frame};
use whipgate::media::h264::elementary_stream_frames;

/// The sample's frames, in decode order.
fn ffmpeg(args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("ffmpeg")
        .args(["-nostdin", "-v", "error", "-y"])
        .args(args)
        .output()
        .context("running ffmpeg")?;
    ensure!(
        out.status.success(),
        "ffmpeg {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

pub fn load_sample_frames() -> anyhow::Result<Vec<Frame>> {
    let dir = tempfile::tempdir()?;
    let sample = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("samples/sample.mkv");
    let sample = sample.to_str().context("sample path")?;
    let h264 = dir.path().join("v.h264");
    let aac = dir.path().join("a.aac");
    // AUDs mark the access unit boundaries.
    ffmpeg(&[
        "-i",
        sample,
        "-an",
        "-c:v",
        "copy",
        "-bsf:v",
        "h264_mp4toannexb,h264_metadata=aud=insert",
        "-f",
        "h264",
        h264.to_str().context("path")?,
    ])?;
    ffmpeg(&[
        "-i",
        sample,
        "-vn",
        "-c:a",
        "aac",
        "-b:a",
        "128k",
        "-ar",
        "48000",
        "-ac",
        "2",
        "-f",
        "adts",
        aac.to_str().context("path")?,
    ])?;
    let mut frames = video_frames(&std::fs::read(&h264)?)?;
    frames.extend(audio_frames(&std::fs::read(&aac)?)?);
    frames.sort_by_key(|f| f.dts);
    Ok(frames)
}

/// Access units of an Annex B stream with AUDs, at 30 fps.
fn video_frames(data: &[u8]) -> anyhow::Result<Vec<Frame>> {
    let frames = elementary_stream_frames(data, 3000).context("the sample's H264")?;
    ensure!(frames.len() > 250, "only {} video frames", frames.len());
    ensure!(frames[0].key, "the sample starts on a keyframe");
    Ok(frames)
}

/// Raw AAC frames of an ADTS stream.
fn audio_frames(mut data: &[u8]) -> anyhow::Result<Vec<Frame>> {
    const RATES: [u32; 13] = [
        96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350,
    ];
    let mut frames = Vec::new();
    let mut params: Option<Arc<CodecParams>> = None;
    while data.len() >= 7 {
        ensure!(data[0] == 0xff && data[1] & 0xf0 == 0xf0, "ADTS sync lost");
        let header = if data[1] & 1 == 1 { 7 } else { 9 };
        let length = (usize::from(data[3] & 3) << 11)
            | (usize::from(data[4]) << 3)
            | usize::from(data[5] >> 5);
        ensure!(length > header && length <= data.len(), "bad ADTS length");
        let object = (data[2] >> 6) + 1;
        let rate_index = (data[2] >> 2) & 0xf;
        let channels = ((data[2] & 1) << 2) | (data[3] >> 6);
        let sample_rate = *RATES
            .get(usize::from(rate_index))
            .context("bad sample rate")?;
        let params = params
            .get_or_insert_with(|| {
                let asc = (u16::from(object) << 11)
                    | (u16::from(rate_index) << 7)
                    | (u16::from(channels) << 3);
                Arc::new(CodecParams::Aac {
                    asc: Bytes::copy_from_slice(&asc.to_be_bytes()),
                    sample_rate,
                    channels,
                })
            })
            .clone();
        let ticks = frames.len() as i64 * 1024 * 90_000 / i64::from(sample_rate);
        frames.push(Frame {
            pts: ticks,
            dts: ticks,
            key: true,
            data: Bytes::copy_from_slice(&data[header..length]),
            params,
        });
        data = &data[length..];
    }
    ensure!(frames.len() > 400, "only {} audio frames", frames.len());
    Ok(frames)
}
