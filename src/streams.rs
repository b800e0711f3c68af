//! The streams the server knows and who publishes them. A stream is created
//! on its first publication and keeps its hub and outputs afterwards, so a
//! publisher coming back continues the same HLS playlist (with a
//! discontinuity).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::hub::Hub;
use crate::{hls, transcode};

/// A publishing session as the HTTP layer sees it.
#[derive(Debug)]
pub struct SessionInfo {
    pub id: String,
    pub stream: String,
    pub etag: String,
    pub publication_id: u64,
    pub created: Instant,
}

pub struct Stream {
    pub name: String,
    pub hub: Arc<Hub>,
    /// The current publishing session, if any.
    pub session: Mutex<Option<Arc<SessionInfo>>>,
    /// Held while a publication is negotiated.
    pub negotiating: tokio::sync::Mutex<()>,
    outputs: Mutex<Vec<JoinHandle<()>>>,
}

pub struct Streams {
    config: Arc<Config>,
    streams: Mutex<HashMap<String, Arc<Stream>>>,
    sessions: Mutex<HashMap<String, Arc<SessionInfo>>>,
    next_publication: AtomicU64,
    shutdown: watch::Receiver<bool>,
}

impl Streams {
    pub fn new(config: Arc<Config>, shutdown: watch::Receiver<bool>) -> Arc<Self> {
        Arc::new(Self {
            config,
            streams: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            next_publication: AtomicU64::new(1),
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
        let outputs = vec![
            tokio::spawn(transcode::rendition::run_aac(
                hub.clone(),
                transcode::audio::AacSettings::default(),
                self.shutdown.clone(),
            )),
            tokio::spawn(hls::output::run(
                hub.clone(),
                self.config.hls.clone(),
                self.config.server.data_dir.join("hls").join(name),
                self.shutdown.clone(),
            )),
        ];
        let stream = Arc::new(Stream {
            name: name.to_owned(),
            hub,
            session: Mutex::new(None),
            negotiating: tokio::sync::Mutex::new(()),
            outputs: Mutex::new(outputs),
        });
        streams.insert(name.to_owned(), stream.clone());
        stream
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

    /// Waits for every output to finish (after shutdown was signalled).
    pub async fn join_outputs(&self) {
        let handles: Vec<_> = lock(&self.streams)
            .values()
            .flat_map(|s| std::mem::take(&mut *lock(&s.outputs)))
            .collect();
        for h in handles {
            let _ = h.await;
        }
    }
}

pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
