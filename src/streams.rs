//! The streams the server knows and who publishes them. A stream is created
//! on its first publication and keeps its hub and outputs afterwards, so a
//! publisher coming back continues the same HLS playlist (with a
//! discontinuity).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::error::AppError;
use crate::hub::Hub;
use crate::preset::{AudioMode, Preset, VideoMode};
use crate::rtmp::push::{self, PushHandle, PushOptions};
use crate::rtmp::target::Target;
use crate::{hls, transcode};

/// A publishing session as the HTTP layer sees it.
#[derive(Debug)]
pub struct SessionInfo {
    pub id: String,
    pub stream: String,
    /// Strong ETag of the current ICE session; an ICE restart changes it.
    pub etag: Mutex<String>,
    pub publication_id: u64,
    pub created: Instant,
}

impl SessionInfo {
    pub fn etag(&self) -> String {
        lock(&self.etag).clone()
    }
}

pub struct Stream {
    pub name: String,
    pub hub: Arc<Hub>,
    /// What the outputs are made of (`streams.NAME.preset`).
    pub preset: Arc<Preset>,
    /// The current publishing session, if any.
    pub session: Mutex<Option<Arc<SessionInfo>>>,
    /// RTMP push targets, from the config and the API.
    pub pushes: Mutex<Vec<PushEntry>>,
    /// Held while a publication is negotiated.
    pub negotiating: tokio::sync::Mutex<()>,
    outputs: Mutex<Vec<JoinHandle<()>>>,
}

/// One push target of a stream.
pub struct PushEntry {
    pub id: u64,
    pub handle: PushHandle,
}

pub struct Streams {
    config: Arc<Config>,
    streams: Mutex<HashMap<String, Arc<Stream>>>,
    sessions: Mutex<HashMap<String, Arc<SessionInfo>>>,
    next_publication: AtomicU64,
    next_push: AtomicU64,
    shutdown: watch::Receiver<bool>,
}

impl Streams {
    pub fn new(config: Arc<Config>, shutdown: watch::Receiver<bool>) -> Arc<Self> {
        Arc::new(Self {
            config,
            streams: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            next_publication: AtomicU64::new(1),
            next_push: AtomicU64::new(1),
            shutdown,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The stream called `name`, created with its outputs on first use.
    pub fn get_or_create(&self, name: &str) -> Arc<Stream> {
        let mut streams = lock(&self.streams);
        if let Some(s) = streams.get(name) {
            return s.clone();
        }
        let hub = Hub::new(name);
        let preset = self.config.preset(name);
        if preset.video.mode == VideoMode::Transcode {
            tracing::warn!(
                stream = name,
                preset = %preset.name,
                "the preset's video renditions are not encoded yet: the video is copied as published"
            );
        }
        let mut outputs = Vec::new();
        // Only an AAC preset transcodes the Opus; with `copy` and `drop`
        // the outputs that need AAC (MPEG-TS HLS, RTMP) go without audio.
        if let Some(settings) = preset.audio.aac_settings() {
            outputs.push(tokio::spawn(transcode::rendition::run_aac(
                hub.clone(),
                settings,
                self.shutdown.clone(),
            )));
        }
        // A VP8 publisher's video becomes H264 (idle for H264 publishers),
        // with keyframes on the HLS segment grid.
        if preset.video.encodes_vp8() {
            let settings = transcode::video::VideoSettings {
                keyframe_interval: (self.config.hls.segment_duration
                    * crate::media::frame::CLOCK_HZ as f64)
                    .round() as i64,
                ..Default::default()
            };
            outputs.push(tokio::spawn(transcode::rendition::run_h264(
                hub.clone(),
                settings,
                self.shutdown.clone(),
            )));
        }
        outputs.push(tokio::spawn(hls::output::run(
            hub.clone(),
            self.config.hls.clone(),
            self.config.server.data_dir.join("hls").join(name),
            output_tracks(&preset),
            self.shutdown.clone(),
        )));
        let stream = Arc::new(Stream {
            name: name.to_owned(),
            hub,
            preset,
            session: Mutex::new(None),
            pushes: Mutex::new(Vec::new()),
            negotiating: tokio::sync::Mutex::new(()),
            outputs: Mutex::new(outputs),
        });
        streams.insert(name.to_owned(), stream.clone());
        drop(streams);
        for url in &self.config.stream(name).push {
            let url = url.replace("{stream}", name);
            if let Err(e) = self.add_push(&stream, &url) {
                tracing::error!(stream = name, error = %e, "push target not started");
            }
        }
        stream
    }

    pub fn get(&self, name: &str) -> Option<Arc<Stream>> {
        lock(&self.streams).get(name).cloned()
    }

    /// Every stream, sorted by name.
    pub fn all(&self) -> Vec<Arc<Stream>> {
        let mut all: Vec<_> = lock(&self.streams).values().cloned().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Starts pushing `stream` to `url` (rtmp:// or rtmps://); returns the
    /// target's id.
    pub fn add_push(&self, stream: &Stream, url: &str) -> Result<u64, AppError> {
        let target = Target::parse(url).map_err(|e| AppError::BadRequest(e.to_string()))?;
        let id = self.next_push.fetch_add(1, Ordering::Relaxed);
        let tracks = output_tracks(&stream.preset);
        let options = PushOptions {
            ca_file: self.config.rtmp.ca_file.clone(),
            video: tracks.video,
            audio: tracks.audio,
            ..Default::default()
        };
        let handle = push::spawn(stream.hub.clone(), target, options, self.shutdown.clone());
        lock(&stream.pushes).push(PushEntry { id, handle });
        Ok(id)
    }

    /// Stops and forgets a push target; false when there is no such id.
    pub fn remove_push(&self, stream: &Stream, id: u64) -> bool {
        let mut pushes = lock(&stream.pushes);
        let Some(i) = pushes.iter().position(|p| p.id == id) else {
            return false;
        };
        pushes.remove(i).handle.stop();
        true
    }

    pub fn next_publication_id(&self) -> u64 {
        self.next_publication.fetch_add(1, Ordering::Relaxed)
    }

    pub fn session(&self, id: &str) -> Option<Arc<SessionInfo>> {
        lock(&self.sessions).get(id).cloned()
    }

    pub fn session_count(&self) -> usize {
        lock(&self.sessions).len()
    }

    pub fn add_session(&self, stream: &Stream, info: Arc<SessionInfo>) {
        *lock(&stream.session) = Some(info.clone());
        lock(&self.sessions).insert(info.id.clone(), info);
    }

    /// Forgets a session (it ended, or its negotiation failed).
    pub fn remove_session(&self, id: &str) {
        let Some(info) = lock(&self.sessions).remove(id) else {
            return;
        };
        if let Some(stream) = lock(&self.streams).get(&info.stream) {
            let mut current = lock(&stream.session);
            if current.as_ref().is_some_and(|s| s.id == id) {
                *current = None;
            }
        }
    }

    /// Waits for every output to finish (after shutdown was signalled):
    /// playlists end, pushes unpublish.
    pub async fn join_outputs(&self) {
        let streams: Vec<_> = lock(&self.streams).values().cloned().collect();
        for s in streams {
            let outputs = std::mem::take(&mut *lock(&s.outputs));
            for h in outputs {
                let _ = h.await;
            }
            let pushes = std::mem::take(&mut *lock(&s.pushes));
            for p in pushes {
                let ended = tokio::time::timeout(Duration::from_secs(5), p.handle.stopped());
                if ended.await.is_err() {
                    tracing::warn!(stream = %s.name, "a push did not end within 5 s");
                }
            }
        }
    }
}

/// The tracks MPEG-TS HLS and RTMP pushes get under a preset: the video unless
/// dropped (encoded renditions are not made yet: the published video), the
/// audio only as AAC.
fn output_tracks(preset: &Preset) -> hls::output::Tracks {
    hls::output::Tracks {
        video: preset.video.mode != VideoMode::Drop,
        audio: preset.audio.mode == AudioMode::Aac,
    }
}

pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
