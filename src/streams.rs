//! The streams the server knows and who publishes them. A stream is created
//! on its first publication and keeps its hub and outputs afterwards, so a
//! publisher coming back continues the same HLS playlist (with a
//! discontinuity).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::config::{Config, HlsConfig, StreamConfig};
use crate::error::AppError;
use crate::hub::{Hub, HubFrame, Publication, Sink};
use crate::media::frame::{CLOCK_HZ, Codec, CodecParams, TrackKind};
use crate::preset::{AudioMode, Gop, Preset, VideoMode};
use crate::rtmp::push::{self, PushHandle, PushOptions};
use crate::rtmp::target::Target;
use crate::state::StreamStore;
use crate::{hls, telemetry, transcode};

/// A publishing session as the HTTP layer sees it.
#[derive(Debug)]
pub struct SessionInfo {
    pub id: String,
    pub stream: String,
    /// Strong ETag of the current ICE session; an ICE restart changes it.
    pub etag: Mutex<String>,
    pub publication_id: u64,
    pub created: Instant,
    /// The publisher's address, as the HTTP server saw it.
    pub client_ip: Option<IpAddr>,
}

impl SessionInfo {
    pub fn etag(&self) -> String {
        lock(&self.etag).clone()
    }
}

pub struct Stream {
    pub name: String,
    pub hub: Arc<Hub>,
    /// The renditions the outputs carry, the first one pushed over RTMP:
    /// the publisher's hub itself, or the hubs of encoded renditions.
    pub renditions: Vec<RenditionHub>,
    /// What the outputs are made of (`streams.NAME.preset`).
    pub preset: Arc<Preset>,
    /// The HLS settings the HLS output runs with.
    pub hls: HlsConfig,
    /// What the publisher sends, measured on the hub.
    pub media: Arc<Mutex<LiveMedia>>,
    /// The current publishing session, if any.
    pub session: Mutex<Option<Arc<SessionInfo>>>,
    /// RTMP push targets, from the config and the API.
    pub pushes: Mutex<Vec<PushEntry>>,
    /// Held while a publication is negotiated.
    pub negotiating: tokio::sync::Mutex<()>,
    outputs: Mutex<Vec<JoinHandle<()>>>,
    /// Ends this stream's outputs (it is replaced by one with new settings).
    retire: Arc<Notify>,
    /// Set on shutdown or when the stream is retired: its outputs end.
    stop: watch::Receiver<bool>,
}

impl Stream {
    /// The simulcast layers the preset takes as renditions: RID and hub.
    pub fn layers(&self) -> Vec<(String, Arc<Hub>)> {
        self.renditions
            .iter()
            .filter_map(|r| Some((r.rid.clone()?, r.hub.clone())))
            .collect()
    }

    /// The hub of rendition `name`; `None` names the first (what pushes
    /// carry by default).
    pub fn rendition_hub(&self, name: Option<&str>) -> Option<&Arc<Hub>> {
        match name {
            None => Some(self.renditions.first().map_or(&self.hub, |r| &r.hub)),
            Some(n) => self.renditions.iter().find(|r| r.name == n).map(|r| &r.hub),
        }
    }

    pub fn rendition_names(&self) -> Vec<&str> {
        self.renditions.iter().map(|r| r.name.as_str()).collect()
    }

    /// A publisher is connected or connecting.
    pub fn busy(&self) -> bool {
        lock(&self.session).is_some()
            || self.hub.publication().is_some()
            || self.negotiating.try_lock().is_err()
    }
}

/// One push target of a stream.
pub struct PushEntry {
    pub id: u64,
    pub handle: PushHandle,
    /// The destination (its key is secret: show `target.masked()`).
    pub target: Target,
    /// From the stream's settings (`push`), not added with `POST
    /// .../push`: replaced when the settings change.
    pub from_settings: bool,
}

/// Where a stream's settings come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SettingsSource {
    /// Created or changed through the API (kept in the state file).
    Api,
    /// `[streams.NAME]` of the config file.
    Config,
    /// `[stream_defaults]`.
    Defaults,
}

/// What a stream's current publisher sends, measured on the hub over the
/// last couple of seconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LiveMedia {
    /// The publication these figures are about.
    #[serde(skip)]
    pub publication: Option<u64>,
    pub video: Option<VideoStats>,
    pub audio: Option<AudioStats>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct VideoStats {
    pub codec: &'static str,
    pub width: u32,
    pub height: u32,
    /// Frames per second.
    pub frame_rate: f64,
    /// Bits per second of the published video (payload, no RTP overhead).
    pub bitrate: u64,
    /// Keyframes seen since the publication started.
    pub keyframes: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct AudioStats {
    pub codec: &'static str,
    pub sample_rate: u32,
    pub channels: u8,
    /// Bits per second of the published audio (payload).
    pub bitrate: u64,
}

pub struct Streams {
    config: Arc<Config>,
    /// Streams defined through the API, over the config's `[streams]`.
    store: Arc<StreamStore>,
    streams: Mutex<HashMap<String, Arc<Stream>>>,
    sessions: Mutex<HashMap<String, Arc<SessionInfo>>>,
    next_publication: AtomicU64,
    next_push: AtomicU64,
    shutdown: watch::Receiver<bool>,
}

impl Streams {
    /// Streams whose API-defined settings are kept in memory only.
    pub fn new(config: Arc<Config>, shutdown: watch::Receiver<bool>) -> Arc<Self> {
        Self::with_store(config, Arc::new(StreamStore::in_memory()), shutdown)
    }

    pub fn with_store(
        config: Arc<Config>,
        store: Arc<StreamStore>,
        shutdown: watch::Receiver<bool>,
    ) -> Arc<Self> {
        Arc::new(Self {
            config,
            store,
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

    pub fn store(&self) -> &Arc<StreamStore> {
        &self.store
    }

    /// The settings of stream `name` now: defined through the API, else
    /// the config file's.
    pub fn settings(&self, name: &str) -> StreamConfig {
        self.store
            .get(name)
            .unwrap_or_else(|| self.config.stream(name).clone())
    }

    pub fn settings_source(&self, name: &str) -> SettingsSource {
        if self.store.contains(name) {
            SettingsSource::Api
        } else if self.config.streams.contains_key(name) {
            SettingsSource::Config
        } else {
            SettingsSource::Defaults
        }
    }

    /// True when the running stream's outputs were made for other settings
    /// than its current ones (preset, HLS): they are remade when it next
    /// starts without a publisher.
    pub fn outdated(&self, stream: &Stream) -> bool {
        let settings = self.settings(&stream.name);
        self.config.preset_with(&settings).name != stream.preset.name
            || self.config.hls_with(&settings) != stream.hls
    }

    /// The stream called `name`, created with its outputs on first use.
    /// A stream whose settings changed (API) and that has no publisher is
    /// replaced by one made with the new settings: its playlist ends, the
    /// new one starts in the same directory, push targets added through
    /// the API move over.
    pub fn get_or_create(&self, name: &str) -> Arc<Stream> {
        let mut streams = lock(&self.streams);
        let mut previous = None;
        if let Some(s) = streams.get(name) {
            if s.busy() || !self.outdated(s) {
                return s.clone();
            }
            previous = streams.remove(name);
        }
        let settings = self.settings(name);
        let hub = Hub::new(name);
        let preset = self.config.preset_with(&settings);
        let hls_config = self.config.hls_with(&settings);
        // The old outputs end first (the HLS output ends its playlist in
        // the directory the new one takes over); API push targets move.
        let mut old_outputs = Vec::new();
        let mut moved_pushes = Vec::new();
        if let Some(old) = previous {
            tracing::info!(stream = name, preset = %preset.name, "stream settings changed: outputs remade");
            old.retire.notify_one();
            old_outputs = std::mem::take(&mut *lock(&old.outputs));
            for p in std::mem::take(&mut *lock(&old.pushes)) {
                p.handle.stop();
                if !p.from_settings {
                    moved_pushes.push((p.id, p.target));
                }
            }
        }
        let retire = Arc::new(Notify::new());
        let stop = stop_signal(self.shutdown.clone(), retire.clone());
        let mut outputs = Vec::new();
        // Only an AAC preset transcodes the Opus; with `copy` and `drop`
        // the outputs that need AAC (MPEG-TS HLS, RTMP) go without audio.
        if let Some(settings) = preset.audio.aac_settings() {
            outputs.push(tokio::spawn(transcode::rendition::run_aac(
                hub.clone(),
                settings,
                stop.clone(),
            )));
        }
        let tracks = output_tracks(&preset);
        let (renditions, rungs) = ladder(name, &hub, &preset, &hls_config);
        if !rungs.is_empty() {
            outputs.push(tokio::spawn(transcode::rendition::run_h264(
                hub.clone(),
                rungs,
                stop.clone(),
            )));
        }
        // Renditions with hubs of their own (encoded rungs, simulcast
        // layers) get the stream's audio, transcoded once.
        let others: Vec<Arc<Hub>> = renditions
            .iter()
            .filter(|r| !Arc::ptr_eq(&r.hub, &hub))
            .map(|r| r.hub.clone())
            .collect();
        if !others.is_empty() {
            outputs.push(tokio::spawn(forward_audio(
                hub.clone(),
                others,
                output_audio(tracks),
                stop.clone(),
            )));
        }
        // One rendition: its HLS is the stream's. Several: one media
        // playlist each under `NAME/`, and the master playlist.
        let dir = self.config.server.data_dir.join("hls").join(name);
        let mut hls_outputs = Vec::new();
        if let [only] = renditions.as_slice() {
            hls_outputs.push(tokio::spawn(hls::output::run(
                only.hub.clone(),
                hls_config.clone(),
                dir.clone(),
                tracks,
                None,
                stop.clone(),
            )));
        } else {
            let names: Arc<[String]> = renditions.iter().map(|r| r.name.clone()).collect();
            let (tx, rx) = watch::channel(vec![Default::default(); renditions.len()]);
            for (index, r) in renditions.iter().enumerate() {
                let report = hls::master::Report {
                    tx: tx.clone(),
                    index,
                    names: names.clone(),
                };
                hls_outputs.push(tokio::spawn(hls::output::run(
                    r.hub.clone(),
                    hls_config.clone(),
                    dir.join(&r.name),
                    tracks,
                    Some(report),
                    stop.clone(),
                )));
            }
            let version = if hls_config.format.is_fmp4() { 7 } else { 3 };
            hls_outputs.push(tokio::spawn(hls::master::run(
                dir,
                names.to_vec(),
                rx,
                version,
                stop.clone(),
            )));
        }
        // The old outputs end first (they share the directory).
        outputs.push(tokio::spawn(async move {
            for h in old_outputs {
                let _ = h.await;
            }
            for h in hls_outputs {
                let _ = h.await;
            }
        }));
        let media = Arc::new(Mutex::new(LiveMedia::default()));
        outputs.push(tokio::spawn(measure(
            hub.clone(),
            media.clone(),
            stop.clone(),
        )));
        let stream = Arc::new(Stream {
            name: name.to_owned(),
            hub,
            renditions,
            preset,
            hls: hls_config,
            media,
            session: Mutex::new(None),
            pushes: Mutex::new(Vec::new()),
            negotiating: tokio::sync::Mutex::new(()),
            outputs: Mutex::new(outputs),
            retire,
            stop,
        });
        streams.insert(name.to_owned(), stream.clone());
        drop(streams);
        self.start_settings_pushes(&stream, &settings);
        for (id, target) in moved_pushes {
            self.spawn_push(&stream, id, target, false);
        }
        stream
    }

    fn start_settings_pushes(&self, stream: &Stream, settings: &StreamConfig) {
        for url in &settings.push {
            let url = url.replace("{stream}", &stream.name);
            match Target::parse(&url) {
                Ok(target) => {
                    let id = self.next_push.fetch_add(1, Ordering::Relaxed);
                    self.spawn_push(stream, id, target, true);
                }
                Err(e) => {
                    tracing::error!(stream = %stream.name, error = %e, "push target not started")
                }
            }
        }
    }

    /// Makes the running stream `name` (if any) push to the targets of its
    /// current settings: targets no longer listed stop, new ones start,
    /// unchanged ones go on undisturbed. Targets added with `POST .../push`
    /// are left alone.
    pub fn apply_push_settings(&self, name: &str) {
        let Some(stream) = self.get(name) else { return };
        let wanted: Vec<String> = self
            .settings(name)
            .push
            .iter()
            .map(|u| u.replace("{stream}", name))
            .collect();
        let mut have = Vec::new();
        lock(&stream.pushes).retain(|p| {
            if !p.from_settings {
                return true;
            }
            let url = p.target.configured();
            if wanted.contains(&url) && !have.contains(&url) {
                have.push(url);
                true
            } else {
                p.handle.stop();
                false
            }
        });
        for url in wanted {
            if have.contains(&url) {
                continue;
            }
            have.push(url.clone());
            match Target::parse(&url) {
                Ok(target) => {
                    let id = self.next_push.fetch_add(1, Ordering::Relaxed);
                    self.spawn_push(&stream, id, target, true);
                }
                Err(e) => tracing::error!(stream = name, error = %e, "push target not started"),
            }
        }
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
        if stream.rendition_hub(target.rendition.as_deref()).is_none() {
            return Err(AppError::Unacceptable(format!(
                "no rendition {:?} in this stream (its preset has: {})",
                target.rendition.as_deref().unwrap_or_default(),
                stream.rendition_names().join(", ")
            )));
        }
        let id = self.next_push.fetch_add(1, Ordering::Relaxed);
        self.spawn_push(stream, id, target, false);
        Ok(id)
    }

    fn spawn_push(&self, stream: &Stream, id: u64, target: Target, from_settings: bool) {
        let tracks = output_tracks(&stream.preset);
        let options = PushOptions {
            ca_file: self.config.rtmp.ca_file.clone(),
            video: tracks.video,
            audio: tracks.audio,
            ..Default::default()
        };
        let Some(hub) = stream.rendition_hub(target.rendition.as_deref()) else {
            tracing::error!(stream = %stream.name, target = %target.masked(), renditions = ?stream.rendition_names(), "push target not started: the stream has no such rendition");
            return;
        };
        let handle = push::spawn(hub.clone(), target.clone(), options, stream.stop.clone());
        lock(&stream.pushes).push(PushEntry {
            id,
            handle,
            target,
            from_settings,
        });
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

/// A signal that turns true on shutdown or when `retire` is notified.
fn stop_signal(mut shutdown: watch::Receiver<bool>, retire: Arc<Notify>) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(*shutdown.borrow());
    tokio::spawn(async move {
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => {}
            _ = retire.notified() => {}
        }
        tx.send_replace(true);
        // Held until every output has seen it.
        tx.closed().await;
    });
    rx
}

/// How long the figures of [`LiveMedia`] are measured over.
const MEASURE_WINDOW: Duration = Duration::from_secs(2);

/// A hub sink that measures what the publisher sends (codecs, size, frame
/// rate, bitrates) into `media`, until the stream closes.
async fn measure(hub: Arc<Hub>, media: Arc<Mutex<LiveMedia>>, mut stop: watch::Receiver<bool>) {
    static CODECS: &[Codec] = &[Codec::H264, Codec::Vp8, Codec::Vp9, Codec::Av1, Codec::Opus];
    let meter = Meter {
        media,
        window: Instant::now(),
        video_bytes: 0,
        video_frames: 0,
        audio_bytes: 0,
    };
    let attached = hub.attach("stats", CODECS, Box::new(meter));
    let _ = stop.changed().await;
    attached.detach();
}

/// What [`measure`] counts over the current window.
struct Meter {
    media: Arc<Mutex<LiveMedia>>,
    window: Instant,
    video_bytes: u64,
    video_frames: u64,
    audio_bytes: u64,
}

impl Meter {
    fn restart_window(&mut self) {
        self.window = Instant::now();
        (self.video_bytes, self.video_frames, self.audio_bytes) = (0, 0, 0);
    }
}

impl Sink for Meter {
    fn frame(&mut self, f: HubFrame) {
        let media = self.media.clone();
        let mut m = lock(&media);
        if m.publication != Some(f.publication.id) {
            *m = LiveMedia {
                publication: Some(f.publication.id),
                ..Default::default()
            };
            self.restart_window();
        }
        // A VP8, VP9 or AV1 publisher's video comes back as H264 from the
        // transcoder: what is measured is what was published.
        let transcoded = m.video.as_ref().is_some_and(|v| v.codec != "h264");
        if transcoded && f.frame.codec() == Codec::H264 {
            return;
        }
        let codec = telemetry::codec_name(f.frame.codec());
        let size = f.frame.data.len() as u64;
        match f.frame.codec().kind() {
            TrackKind::Video => {
                self.video_bytes += size;
                self.video_frames += 1;
                let v = m.video.get_or_insert_with(VideoStats::default);
                v.codec = codec;
                if let Some(size) = f.frame.params.picture_size() {
                    (v.width, v.height) = size;
                }
                v.keyframes += u64::from(f.frame.key);
            }
            TrackKind::Audio => {
                self.audio_bytes += size;
                let a = m.audio.get_or_insert_with(AudioStats::default);
                a.codec = codec;
                if let CodecParams::Opus {
                    sample_rate,
                    channels,
                }
                | CodecParams::Aac {
                    sample_rate,
                    channels,
                    ..
                } = *f.frame.params
                {
                    (a.sample_rate, a.channels) = (sample_rate, channels);
                }
            }
        }
        let elapsed = self.window.elapsed();
        if elapsed >= MEASURE_WINDOW {
            let secs = elapsed.as_secs_f64();
            if let Some(v) = m.video.as_mut() {
                v.frame_rate = (self.video_frames as f64 / secs * 10.0).round() / 10.0;
                v.bitrate = (self.video_bytes as f64 * 8.0 / secs) as u64;
            }
            if let Some(a) = m.audio.as_mut() {
                a.bitrate = (self.audio_bytes as f64 * 8.0 / secs) as u64;
            }
            self.restart_window();
        }
    }

    fn stopped(&mut self, _publication: Publication) {
        *lock(&self.media) = LiveMedia::default();
    }
}

/// The tracks MPEG-TS HLS and RTMP pushes get under a preset: the video unless
/// dropped (encoded renditions are not made yet: the published video), the
/// audio only as AAC.
/// One rendition of a stream's outputs.
pub struct RenditionHub {
    /// The preset's name for it (its HLS directory in a ladder).
    pub name: String,
    pub hub: Arc<Hub>,
    /// A simulcast layer's RID: the WebRTC session puts that layer's video
    /// (and the audio) on the hub.
    pub rid: Option<String>,
}

/// The renditions of a stream with `preset`, and the video transcoder's
/// rungs that feed them (none when nothing is encoded). The published
/// video goes on `main`; so does its H264 encoding when the publisher sends
/// another codec (VP8) and the preset copies the source.
fn ladder(
    stream: &str,
    main: &Arc<Hub>,
    preset: &Preset,
    hls: &HlsConfig,
) -> (Vec<RenditionHub>, Vec<transcode::rendition::Rung>) {
    use transcode::video::VideoSettings;
    let segment = (hls.segment_duration * CLOCK_HZ as f64).round() as i64;
    // The published video, encoded at its own size when it is not H264.
    let source_rung = || transcode::rendition::Rung {
        hub: main.clone(),
        settings: VideoSettings {
            keyframe_interval: segment,
            for_h264_input: false,
            ..Default::default()
        },
    };
    let mut renditions = Vec::new();
    let mut rungs = Vec::new();
    if preset.video.mode != VideoMode::Transcode {
        renditions.push(RenditionHub {
            name: "source".into(),
            hub: main.clone(),
            rid: None,
        });
        if preset.video.encodes_non_h264() {
            rungs.push(source_rung());
        }
        return (renditions, rungs);
    }
    for r in &preset.video.renditions {
        if let Some(rid) = &r.simulcast {
            // Filled by the WebRTC session with the layer's frames.
            renditions.push(RenditionHub {
                name: r.name.clone(),
                hub: Hub::new(&format!("{stream}/{}", r.name)),
                rid: Some(rid.clone()),
            });
            continue;
        }
        if r.source {
            renditions.push(RenditionHub {
                name: r.name.clone(),
                hub: main.clone(),
                rid: None,
            });
            if preset.video.encodes_non_h264() {
                rungs.push(source_rung());
            }
            continue;
        }
        let hub = Hub::new(&format!("{stream}/{}", r.name));
        let keyframe_interval = match r.gop() {
            Gop::Segment => segment,
            Gop::Seconds(s) => (s * CLOCK_HZ as f64).round() as i64,
        };
        rungs.push(transcode::rendition::Rung {
            hub: hub.clone(),
            settings: VideoSettings {
                width: r.width,
                height: r.height,
                bitrate: r.bitrate,
                maxrate: r.maxrate(),
                bufsize: r.bufsize(),
                max_fps: r.max_fps,
                keyframe_interval,
                encoder: r.encoder().as_str().to_owned(),
                preset: r.x264_preset().as_str().to_owned(),
                tune: r.x264_tune.clone().unwrap_or_else(|| "zerolatency".into()),
                profile: r.profile().as_str().to_owned(),
                level: r.level.as_ref().map(|l| l.0.clone()),
                for_h264_input: true,
            },
        });
        renditions.push(RenditionHub {
            name: r.name.clone(),
            hub,
            rid: None,
        });
    }
    (renditions, rungs)
}

/// The audio the outputs carry: AAC (transcoded), the published Opus, or
/// none.
fn output_audio(tracks: hls::output::Tracks) -> &'static [Codec] {
    if tracks.audio {
        &[Codec::Aac]
    } else if tracks.opus {
        &[Codec::Opus]
    } else {
        &[]
    }
}

/// Puts the stream's output audio on the hubs of its other renditions, each
/// once whoever feeds its video (the video transcoder, the WebRTC session
/// for a simulcast layer) has started it: every rendition carries the one
/// audio, transcoded once.
async fn forward_audio(
    main: Arc<Hub>,
    renditions: Vec<Arc<Hub>>,
    audio: &'static [Codec],
    mut shutdown: watch::Receiver<bool>,
) {
    if audio.is_empty() {
        return;
    }
    // About 5 s of 20 ms frames.
    let mut sub = main.subscribe("layer-audio", audio, 256);
    loop {
        tokio::select! {
            f = sub.frames.recv() => {
                let Some(hf) = f else { break };
                for hub in &renditions {
                    if hub.publication().is_some_and(|p| p.id == hf.publication.id) {
                        hub.publish(hf.publication, hf.frame.clone());
                    }
                }
            }
            _ = shutdown.changed() => break,
        }
    }
}

fn output_tracks(preset: &Preset) -> hls::output::Tracks {
    hls::output::Tracks {
        video: preset.video.mode != VideoMode::Drop,
        audio: preset.audio.mode == AudioMode::Aac,
        opus: preset.audio.mode == AudioMode::Copy,
    }
}

pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
