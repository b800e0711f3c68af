//! The HLS output of one stream: a hub reader that feeds the segmenter and
//! writes segments and the playlist to the stream's directory (each file
//! written to a temporary name and renamed, so readers never see half a
//! file). It lives as long as the stream: when the publisher leaves the
//! playlist gets `EXT-X-ENDLIST`; when one comes back the playlist goes on
//! with `EXT-X-DISCONTINUITY`.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use super::playlist::{Playlist, PlaylistConfig};
use super::segmenter::{Segment, Segmenter, SegmenterConfig};
use crate::config::HlsConfig;
use crate::hub::{Hub, HubFrame, Publication};
use crate::media::frame::{CLOCK_HZ, Codec};
use crate::telemetry;

/// Frames queued for the HLS writer before it drops (about 10 s of media).
const QUEUE: usize = 1024;

/// The tracks of a publication that go into the HLS (the stream's preset
/// decides): a track left out is neither declared nor waited for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tracks {
    /// The H264 video.
    pub video: bool,
    /// The audio, as AAC (there is no AAC when the preset does not
    /// transcode the Opus to it, and MPEG-TS HLS does not carry Opus).
    pub audio: bool,
}

impl Default for Tracks {
    fn default() -> Self {
        Tracks {
            video: true,
            audio: true,
        }
    }
}

struct Output {
    hub: Arc<Hub>,
    dir: PathBuf,
    config: HlsConfig,
    tracks: Tracks,
    playlist: Playlist,
    /// The publication being segmented, and its segmenter.
    current: Option<(Publication, Segmenter)>,
    /// When the current publication's first frame reached this output.
    first_frame_at: Instant,
    /// The last publication that ended: its late frames (the audio
    /// transcoder's flush) are ignored.
    ended: Option<u64>,
    /// Added to the current publication's timestamps so that the HLS
    /// timeline goes on across publishers (players and ffmpeg want
    /// monotonic timestamps even across a discontinuity).
    ts_offset: i64,
    /// Latest timestamp written, with the offset.
    ts_last: i64,
    /// Sequence number the current publication's segment 0 gets.
    sequence_base: u64,
    /// Segment files still on disk, oldest first.
    on_disk: VecDeque<String>,
}

pub async fn run(
    hub: Arc<Hub>,
    config: HlsConfig,
    dir: PathBuf,
    tracks: Tracks,
    mut shutdown: watch::Receiver<bool>,
) {
    let span = tracing::info_span!("hls", stream = %hub.name());
    let codecs: &'static [Codec] = match (tracks.video, tracks.audio) {
        (true, false) => &[Codec::H264],
        (false, true) => &[Codec::Aac],
        _ => &[Codec::H264, Codec::Aac],
    };
    let mut sub = hub.subscribe("hls", codecs, QUEUE);
    if let Err(e) = reset_dir(&dir).await {
        tracing::error!(parent: &span, dir = %dir.display(), error = %e, "cannot prepare the HLS directory; HLS is off for this stream");
        return;
    }
    let mut out = Output {
        hub: hub.clone(),
        dir,
        playlist: Playlist::new(PlaylistConfig {
            target_duration: config.target(),
            window: config.playlist_size,
        }),
        config,
        tracks,
        current: None,
        first_frame_at: Instant::now(),
        ended: None,
        ts_offset: 0,
        ts_last: 0,
        sequence_base: 0,
        on_disk: VecDeque::new(),
    };
    loop {
        tokio::select! {
            biased;
            frame = sub.frames.recv() => match frame {
                Some(f) => out.frame(f, &span).await,
                None => break,
            },
            changed = sub.state.changed() => {
                if changed.is_err() {
                    break;
                }
                let live = *sub.state.borrow_and_update();
                if live.is_none() {
                    // Frames the publisher sent before leaving come first.
                    while let Ok(f) = sub.frames.try_recv() {
                        out.frame(f, &span).await;
                    }
                    out.end(&span).await;
                }
            }
            _ = shutdown.changed() => break,
        }
    }
    while let Ok(f) = sub.frames.try_recv() {
        out.frame(f, &span).await;
    }
    out.end(&span).await;
}

impl Output {
    async fn frame(&mut self, hf: HubFrame, span: &tracing::Span) {
        let HubFrame {
            publication,
            mut frame,
        } = hf;
        if self.ended == Some(publication.id) {
            return;
        }
        if self.current.as_ref().map(|(p, _)| p.id) != Some(publication.id) {
            self.end(span).await;
            let segmenter = Segmenter::new(
                SegmenterConfig {
                    target_duration: self.config.target(),
                    ..Default::default()
                },
                publication.video && self.tracks.video,
                publication.audio && self.tracks.audio,
            );
            self.sequence_base = self.playlist.next_sequence();
            if self.sequence_base > 0 {
                // Start a second after the last publication's end.
                self.ts_offset = self.ts_last + CLOCK_HZ;
            }
            self.current = Some((publication, segmenter));
            self.first_frame_at = Instant::now();
        }
        frame.pts += self.ts_offset;
        frame.dts += self.ts_offset;
        self.ts_last = self.ts_last.max(frame.pts);
        let Some((_, segmenter)) = self.current.as_mut() else {
            return;
        };
        let kind = frame.codec().kind();
        match segmenter.push(kind, &frame, unix_ms()) {
            Ok(Some(segment)) => self.write_segment(segment, span).await,
            Ok(None) => {}
            Err(e) => tracing::debug!(parent: span, error = %e, "frame not muxed"),
        }
        if self
            .current
            .as_ref()
            .is_some_and(|(_, s)| s.wants_keyframe())
        {
            self.hub.request_keyframe();
        }
    }

    /// The publication ended: flush the last segment and end the playlist.
    async fn end(&mut self, span: &tracing::Span) {
        let Some((publication, mut segmenter)) = self.current.take() else {
            return;
        };
        self.ended = Some(publication.id);
        if let Some(segment) = segmenter.finish() {
            self.write_segment(segment, span).await;
        }
        self.playlist.end();
        self.write_playlist(span).await;
        tracing::info!(parent: span, "playlist ended");
    }

    async fn write_segment(&mut self, mut segment: Segment, span: &tracing::Span) {
        segment.sequence += self.sequence_base;
        if segment.sequence == self.sequence_base && self.sequence_base > 0 {
            // First segment of a publisher coming back.
            segment.discontinuity = true;
        }
        let name = Playlist::segment_uri(segment.sequence);
        if let Err(e) = write_atomic(&self.dir, &name, &segment.data).await {
            tracing::error!(parent: span, file = %name, error = %e, "cannot write segment");
            return;
        }
        telemetry::counters().hls_segments.increment(1);
        self.on_disk.push_back(name);
        let _removed = self.playlist.push(&segment);
        self.write_playlist(span).await;
        // Keep a few segments after they leave the playlist for late players.
        let keep = self.config.playlist_size + self.config.keep_extra;
        while self.on_disk.len() > keep {
            if let Some(old) = self.on_disk.pop_front() {
                let _ = tokio::fs::remove_file(self.dir.join(&old)).await;
            }
        }
        if segment.sequence == self.sequence_base {
            let ms = self.first_frame_at.elapsed().as_secs_f64() * 1000.0;
            tracing::info!(parent: span, sequence = segment.sequence, duration = segment.duration, since_first_frame_ms = ms, "first segment listed");
        }
        tracing::debug!(parent: span, sequence = segment.sequence, duration = segment.duration, bytes = segment.data.len(), "segment written");
    }

    async fn write_playlist(&self, span: &tracing::Span) {
        let text = self.playlist.render();
        if let Err(e) = write_atomic(&self.dir, "index.m3u8", text.as_bytes()).await {
            tracing::error!(parent: span, error = %e, "cannot write playlist");
        }
    }
}

/// Creates the directory, removing what an earlier run left in it.
async fn reset_dir(dir: &Path) -> std::io::Result<()> {
    match tokio::fs::remove_dir_all(dir).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    tokio::fs::create_dir_all(dir).await
}

async fn write_atomic(dir: &Path, name: &str, data: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    tokio::fs::write(&tmp, data).await?;
    tokio::fs::rename(&tmp, dir.join(name)).await
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
