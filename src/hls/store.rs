//! The in-memory side of a stream's HLS: the playlist as rendered, and the
//! recent segments, init segments and LL-HLS parts, each produced once as
//! [`Bytes`] and shared by every viewer. The HLS output (`output`) fills it;
//! the HTTP side reads it and waits on it.
//!
//! Waiting is async: the output publishes an [`Edge`] (where the live edge
//! is) on a `tokio::sync::watch` channel after every change, and blocked
//! requests wake on it — no thread is ever parked. [`Store::reload`] is
//! RFC 8216bis §6.2.5.2 blocking playlist reload (`_HLS_msn`, `_HLS_part`)
//! with delta updates (`_HLS_skip`, §6.2.5.1); [`Store::part`] is a blocking
//! request for the part a preload hint names (§6.2.6).
//!
//! Outputs register their store under their directory, where the HTTP side
//! finds it ([`register`], [`lookup`]): a stream's HLS directory is unique in
//! a process.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;

/// Where the live edge of a stream's playlist is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Edge {
    /// One more for each change of the store.
    pub version: u64,
    /// The last complete segment listed.
    pub last_segment: Option<u64>,
    /// The newest part: its segment's sequence number, its index in it.
    pub last_part: Option<(u64, u32)>,
    /// The part number the preload hint names.
    pub next_part: u64,
    /// The playlist has `EXT-X-ENDLIST`.
    pub ended: bool,
    /// `EXT-X-TARGETDURATION`, seconds.
    pub target_duration: u64,
    /// LL-HLS part target; `None` for playlists without parts (no blocking).
    pub part_target: Option<Duration>,
}

/// What a blocking playlist reload asks for (RFC 8216bis §6.2.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Directives {
    /// `_HLS_msn`.
    pub msn: Option<u64>,
    /// `_HLS_part`.
    pub part: Option<u64>,
    /// `_HLS_skip=YES` or `v2`: a delta update.
    pub skip: bool,
}

impl Directives {
    /// Reads the `_HLS_` query parameters; other parameters are ignored.
    /// A malformed value, or `_HLS_part` without `_HLS_msn`, is a bad
    /// request.
    pub fn parse(query: &str) -> Result<Self, &'static str> {
        let mut d = Directives::default();
        for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
            let number = || value.parse::<u64>().map_err(|_| "not a decimal integer");
            match &*key {
                "_HLS_msn" => d.msn = Some(number().map_err(|_| "bad _HLS_msn")?),
                "_HLS_part" => d.part = Some(number().map_err(|_| "bad _HLS_part")?),
                "_HLS_skip" => match &*value {
                    "YES" | "v2" => d.skip = true,
                    _ => return Err("_HLS_skip is YES or v2"),
                },
                _ => {}
            }
        }
        if d.part.is_some() && d.msn.is_none() {
            return Err("_HLS_part needs _HLS_msn");
        }
        Ok(d)
    }
}

/// How a blocking reload stands against an edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    /// The playlist has what was asked for.
    Ready,
    /// Not yet.
    Wait,
    /// Further ahead than the spec lets a client wait for.
    TooFar,
}

impl Edge {
    /// Does the playlist contain segment `msn` (`part` absent) or part
    /// `part` of segment `msn` or later? A part index past a complete
    /// segment's last part means part 0 of the next segment (§6.2.5.2).
    pub fn has(&self, msn: u64, part: Option<u64>) -> bool {
        let Some(part) = part else {
            return self.last_segment.is_some_and(|last| last >= msn);
        };
        match self.last_part {
            Some((segment, _)) if segment > msn => true,
            Some((segment, index)) if segment == msn => u64::from(index) >= part,
            _ => self.last_segment.is_some_and(|last| last > msn),
        }
    }

    /// The Advance Part Limit: three target durations in parts (§6.2.5.2).
    pub fn advance_part_limit(&self) -> u64 {
        match self.part_target {
            Some(t) if t < Duration::from_secs(1) && !t.is_zero() => {
                (3.0 / t.as_secs_f64()).floor() as u64
            }
            _ => 3,
        }
    }

    /// A blocking reload of segment `msn` (and part `part`): ready, to wait
    /// for, or too far ahead (`_HLS_msn` beyond the last segment plus two,
    /// or `_HLS_part` beyond the last part by the Advance Part Limit).
    pub fn reload(&self, msn: u64, part: Option<u64>) -> Reload {
        if self.has(msn, part) {
            return Reload::Ready;
        }
        let limit = self.last_segment.map_or(1, |last| last.saturating_add(2));
        if msn > limit {
            return Reload::TooFar;
        }
        if let (Some(part), Some((segment, index))) = (part, self.last_part) {
            let ahead = if msn == segment {
                part.saturating_sub(u64::from(index))
            } else if msn == segment + 1 {
                part + 1
            } else {
                0
            };
            if ahead > self.advance_part_limit() {
                return Reload::TooFar;
            }
        }
        Reload::Wait
    }

    /// How long a blocking request may wait: three target durations.
    pub fn block_timeout(&self) -> Duration {
        Duration::from_secs(3 * self.target_duration.max(1))
    }
}

/// Why a blocking request got no content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    #[error("{0}")]
    BadRequest(&'static str),
    /// Not there within three target durations (503).
    #[error("not available within three target durations")]
    Unavailable,
    /// No such resource, and none is coming (404).
    #[error("no such resource")]
    NotFound,
}

/// One stream's playlist and recent media, in memory.
#[derive(Debug)]
pub struct Store {
    inner: Mutex<Inner>,
    edge: watch::Sender<Edge>,
}

#[derive(Debug, Default)]
struct Inner {
    playlist: Option<Bytes>,
    delta: Option<Bytes>,
    /// Segments, init segments and parts by file name.
    objects: HashMap<String, Bytes>,
}

/// Changes applied at once by [`Store::apply`].
#[derive(Debug, Default)]
pub struct Changes {
    /// Objects added (or replaced) by file name.
    pub insert: Vec<(String, Bytes)>,
    /// Objects dropped by file name.
    pub remove: Vec<String>,
    /// The playlist, and its delta update (LL-HLS), when they changed.
    pub playlist: Option<(Bytes, Option<Bytes>)>,
    /// The new edge (its version is set by the store).
    pub edge: Option<Edge>,
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    pub fn new() -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            edge: watch::channel(Edge::default()).0,
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies `changes`, then wakes whoever waits on the edge: a woken
    /// request always finds the content its edge promises.
    pub fn apply(&self, changes: Changes) {
        {
            let mut inner = self.inner();
            for name in changes.remove {
                inner.objects.remove(&name);
            }
            for (name, data) in changes.insert {
                inner.objects.insert(name, data);
            }
            if let Some((playlist, delta)) = changes.playlist {
                inner.playlist = Some(playlist);
                inner.delta = delta;
            }
        }
        self.edge.send_modify(|edge| {
            let version = edge.version + 1;
            if let Some(new) = changes.edge {
                *edge = new;
            }
            edge.version = version;
        });
    }

    pub fn edge(&self) -> Edge {
        *self.edge.borrow()
    }

    /// The playlist (its delta update when `delta` and there is one);
    /// `None` before anything was listed.
    pub fn playlist(&self, delta: bool) -> Option<Bytes> {
        let inner = self.inner();
        match (&inner.delta, delta) {
            (Some(delta), true) => Some(delta.clone()),
            _ => inner.playlist.clone(),
        }
    }

    /// A segment, init segment or part by file name.
    pub fn get(&self, name: &str) -> Option<Bytes> {
        self.inner().objects.get(name).cloned()
    }

    /// Waits (at most `timeout`) until the edge satisfies `ready`.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        mut ready: impl FnMut(&Edge) -> bool,
    ) -> Option<Edge> {
        let mut rx = self.edge.subscribe();
        let waited = tokio::time::timeout(timeout, rx.wait_for(|e| ready(e))).await;
        match waited {
            Ok(Ok(edge)) => Some(*edge),
            // The store owns the sender: it cannot be gone while we wait.
            Ok(Err(_)) | Err(_) => None,
        }
    }

    /// The playlist for a request with these directives: at once without
    /// `_HLS_msn`, for playlists without parts and once the playlist has
    /// ended (§6.2.5.2: the directives are then ignored); otherwise once it
    /// has what was asked for, within `timeout`.
    pub async fn reload(
        &self,
        directives: Directives,
        timeout: Duration,
    ) -> Result<Option<Bytes>, BlockError> {
        let edge = self.edge();
        let blocking = edge.part_target.is_some();
        let delta = directives.skip && blocking && !edge.ended;
        let Some(msn) = directives.msn.filter(|_| blocking && !edge.ended) else {
            return Ok(self.playlist(delta));
        };
        match edge.reload(msn, directives.part) {
            Reload::Ready => {}
            Reload::TooFar => {
                return Err(BlockError::BadRequest(
                    "_HLS_msn or _HLS_part too far ahead",
                ));
            }
            Reload::Wait => {
                let ready = |e: &Edge| e.ended || e.has(msn, directives.part);
                if self.wait_until(timeout, ready).await.is_none() {
                    return Err(BlockError::Unavailable);
                }
            }
        }
        Ok(self.playlist(delta))
    }

    /// Part `number` (`partK.m4s`): at once when it is there; the part the
    /// preload hint names is waited for (within `timeout`); anything else
    /// is not found (§6.2.6).
    pub async fn part(&self, number: u64, timeout: Duration) -> Result<Bytes, BlockError> {
        let name = super::playlist::Playlist::part_uri(number);
        if let Some(data) = self.get(&name) {
            return Ok(data);
        }
        let edge = self.edge();
        if edge.part_target.is_none() || edge.ended || number != edge.next_part {
            return Err(BlockError::NotFound);
        }
        let ready = |e: &Edge| e.ended || e.next_part > number;
        if self.wait_until(timeout, ready).await.is_none() {
            return Err(BlockError::Unavailable);
        }
        self.get(&name).ok_or(BlockError::NotFound)
    }
}

static REGISTRY: LazyLock<Mutex<HashMap<PathBuf, Arc<Store>>>> = LazyLock::new(Default::default);

fn registry() -> std::sync::MutexGuard<'static, HashMap<PathBuf, Arc<Store>>> {
    REGISTRY.lock().unwrap_or_else(|p| p.into_inner())
}

/// Makes `store` the one of the HLS directory `dir`.
pub fn register(dir: &Path, store: Arc<Store>) {
    registry().insert(dir.to_owned(), store);
}

/// The store of the HLS directory `dir`, while its output runs.
pub fn lookup(dir: &Path) -> Option<Arc<Store>> {
    registry().get(dir).cloned()
}

/// Forgets `store` as the one of `dir` (unless another replaced it).
pub fn unregister(dir: &Path, store: &Arc<Store>) {
    let mut registry = registry();
    if registry.get(dir).is_some_and(|s| Arc::ptr_eq(s, store)) {
        registry.remove(dir);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    const PART: Duration = Duration::from_millis(200);

    /// Segments 0..=`last` complete, `parts` parts of the next one.
    fn edge(last: Option<u64>, open_parts: u32, parts_per_segment: u32) -> Edge {
        let open = last.map_or(0, |l| l + 1);
        let last_part = if open_parts > 0 {
            Some((open, open_parts - 1))
        } else {
            last.map(|l| (l, parts_per_segment - 1))
        };
        let before = last.map_or(0, |l| (l + 1) * u64::from(parts_per_segment));
        Edge {
            version: 1,
            last_segment: last,
            last_part,
            next_part: before + u64::from(open_parts),
            ended: false,
            target_duration: 2,
            part_target: Some(PART),
        }
    }

    #[test]
    fn directives_parse() {
        let d = Directives::parse("_HLS_msn=12&_HLS_part=3&_HLS_skip=YES&x=1").unwrap();
        assert_eq!(
            d,
            Directives {
                msn: Some(12),
                part: Some(3),
                skip: true
            }
        );
        assert_eq!(Directives::parse("").unwrap(), Directives::default());
        assert!(Directives::parse("_HLS_skip=v2").unwrap().skip);
        for bad in [
            "_HLS_part=1",
            "_HLS_msn=-1",
            "_HLS_msn=x",
            "_HLS_msn=1&_HLS_part=",
            "_HLS_skip=NO",
            "_HLS_msn=99999999999999999999999",
        ] {
            assert!(Directives::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reload_decisions() {
        // Segments 0..=4 complete (10 parts each), 3 parts of segment 5.
        let e = edge(Some(4), 3, 10);
        assert_eq!(e.advance_part_limit(), 15);
        assert_eq!(e.reload(4, None), Reload::Ready);
        assert_eq!(e.reload(2, None), Reload::Ready, "older: at once");
        assert_eq!(e.reload(5, None), Reload::Wait);
        assert_eq!(e.reload(6, None), Reload::Wait, "last + 2");
        assert_eq!(e.reload(7, None), Reload::TooFar, "beyond last + 2");
        assert_eq!(e.reload(5, Some(2)), Reload::Ready);
        assert_eq!(e.reload(5, Some(3)), Reload::Wait, "the next part");
        assert_eq!(e.reload(5, Some(17)), Reload::Wait);
        assert_eq!(e.reload(5, Some(18)), Reload::TooFar, "beyond the limit");
        assert_eq!(e.reload(6, Some(0)), Reload::Wait);
        assert_eq!(e.reload(6, Some(15)), Reload::TooFar);
        assert_eq!(e.reload(4, Some(7)), Reload::Ready);
        // A part past a complete segment's last is part 0 of the next one.
        assert_eq!(e.reload(4, Some(12)), Reload::Ready);
        let e = edge(Some(4), 0, 10);
        assert_eq!(e.reload(4, Some(9)), Reload::Ready);
        assert_eq!(
            e.reload(4, Some(10)),
            Reload::Wait,
            "segment 5 has no part yet"
        );
        // Before any segment: the first parts can be waited for.
        let e = edge(None, 2, 10);
        assert_eq!(e.reload(0, Some(1)), Reload::Ready);
        assert_eq!(e.reload(0, Some(2)), Reload::Wait);
        assert_eq!(e.reload(0, None), Reload::Wait);
        assert_eq!(e.reload(1, None), Reload::Wait);
        assert_eq!(e.reload(2, None), Reload::TooFar);
        // Part targets of a second or more: a limit of 3 parts.
        let slow = Edge {
            part_target: Some(Duration::from_secs(1)),
            ..edge(Some(1), 1, 2)
        };
        assert_eq!(slow.advance_part_limit(), 3);
        assert_eq!(slow.reload(2, Some(3)), Reload::Wait);
        assert_eq!(slow.reload(2, Some(4)), Reload::TooFar);
        assert_eq!(edge(Some(1), 0, 1).block_timeout(), Duration::from_secs(6));
    }

    /// A store at `edge` with a playlist naming its version.
    fn store_at(edge: Edge) -> Arc<Store> {
        let store = Arc::new(Store::new());
        publish(&store, edge, &[]);
        store
    }

    fn publish(store: &Store, edge: Edge, parts: &[u64]) {
        let version = store.edge().version + 1;
        store.apply(Changes {
            insert: parts
                .iter()
                .map(|n| (format!("part{n}.m4s"), Bytes::from(format!("part {n}"))))
                .collect(),
            remove: Vec::new(),
            playlist: Some((
                Bytes::from(format!("full {version}")),
                Some(Bytes::from(format!("delta {version}"))),
            )),
            edge: Some(edge),
        });
    }

    fn text(b: Option<Bytes>) -> String {
        String::from_utf8(b.unwrap().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn blocking_reload_wakes_on_the_part_and_times_out() {
        let store = store_at(edge(Some(4), 3, 10));
        let at = |msn, part| Directives {
            msn: Some(msn),
            part,
            skip: false,
        };
        let long = Duration::from_secs(5);
        // Ready: at once, and the delta when asked.
        assert_eq!(
            text(store.reload(at(5, Some(2)), long).await.unwrap()),
            "full 1"
        );
        let skip = Directives {
            skip: true,
            ..at(5, Some(2))
        };
        assert_eq!(text(store.reload(skip, long).await.unwrap()), "delta 1");
        // Too far: at once.
        assert_eq!(
            store.reload(at(9, None), long).await,
            Err(BlockError::BadRequest(
                "_HLS_msn or _HLS_part too far ahead"
            ))
        );

        // The next part: woken by its arrival, not by earlier changes.
        let waiter = {
            let store = store.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let got = store.reload(at(5, Some(4)), long).await;
                (started.elapsed(), got)
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        publish(&store, edge(Some(4), 4, 10), &[53]);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "part 3 is not part 4");
        publish(&store, edge(Some(4), 5, 10), &[54]);
        let (waited, got) = waiter.await.unwrap();
        assert_eq!(text(got.unwrap()), "full 3");
        assert!(
            waited >= Duration::from_millis(100) && waited < long,
            "{waited:?}"
        );

        // Nothing comes: 503 after the timeout.
        let started = Instant::now();
        let short = Duration::from_millis(150);
        assert_eq!(
            store.reload(at(6, None), short).await,
            Err(BlockError::Unavailable)
        );
        assert!(started.elapsed() >= short);

        // The stream ends while a request waits: the final playlist at once.
        let waiter = {
            let store = store.clone();
            tokio::spawn(async move { store.reload(at(6, None), long).await })
        };
        tokio::time::sleep(Duration::from_millis(30)).await;
        publish(
            &store,
            Edge {
                ended: true,
                ..edge(Some(5), 0, 10)
            },
            &[],
        );
        assert_eq!(text(waiter.await.unwrap().unwrap()), "full 4");
        // Ended: directives are ignored, no delta.
        assert_eq!(
            text(store.reload(at(50, Some(1)), long).await.unwrap()),
            "full 4"
        );
        let skip = Directives {
            skip: true,
            ..Directives::default()
        };
        assert_eq!(text(store.reload(skip, long).await.unwrap()), "full 4");
    }

    #[tokio::test]
    async fn playlists_without_parts_never_block() {
        let store = store_at(Edge {
            part_target: None,
            ..edge(Some(1), 0, 1)
        });
        let d = Directives {
            msn: Some(40),
            part: Some(2),
            skip: true,
        };
        let got = store.reload(d, Duration::from_secs(5)).await.unwrap();
        assert_eq!(text(got), "full 1");
        assert_eq!(
            store.part(2, Duration::from_secs(5)).await,
            Err(BlockError::NotFound)
        );
    }

    #[tokio::test]
    async fn hinted_part_is_waited_for_others_are_not_found() {
        // 53 parts made; part 53 is the preload hint.
        let store = store_at(edge(Some(4), 3, 10));
        publish(&store, edge(Some(4), 3, 10), &[52]);
        let long = Duration::from_secs(5);
        assert_eq!(store.part(52, long).await.unwrap(), "part 52");
        assert_eq!(store.part(54, long).await, Err(BlockError::NotFound));
        assert_eq!(store.part(7, long).await, Err(BlockError::NotFound));

        let waiter = {
            let store = store.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                (store.part(53, long).await, started.elapsed())
            })
        };
        tokio::time::sleep(Duration::from_millis(80)).await;
        publish(&store, edge(Some(4), 4, 10), &[53]);
        let (got, waited) = waiter.await.unwrap();
        assert_eq!(got.unwrap(), "part 53");
        assert!(waited >= Duration::from_millis(80) && waited < long);

        // Timeout, then the stream ending under a waiting request.
        let short = Duration::from_millis(100);
        assert_eq!(store.part(54, short).await, Err(BlockError::Unavailable));
        let waiter = {
            let store = store.clone();
            tokio::spawn(async move { store.part(54, long).await })
        };
        tokio::time::sleep(Duration::from_millis(30)).await;
        publish(
            &store,
            Edge {
                ended: true,
                ..edge(Some(5), 0, 10)
            },
            &[],
        );
        assert_eq!(waiter.await.unwrap(), Err(BlockError::NotFound));
    }

    #[test]
    fn registry_finds_the_store_of_a_directory() {
        let dir = Path::new("/nonexistent/whipgate-registry-test/hls/a");
        let (one, two) = (Arc::new(Store::new()), Arc::new(Store::new()));
        register(dir, one.clone());
        assert!(Arc::ptr_eq(&lookup(dir).unwrap(), &one));
        register(dir, two.clone());
        unregister(dir, &one);
        assert!(Arc::ptr_eq(&lookup(dir).unwrap(), &two), "replaced");
        unregister(dir, &two);
        assert!(lookup(dir).is_none());

        let store = Store::new();
        store.apply(Changes {
            insert: vec![("seg1.m4s".into(), Bytes::from_static(b"s"))],
            ..Changes::default()
        });
        assert_eq!(store.get("seg1.m4s").unwrap(), "s");
        assert!(store.playlist(false).is_none());
        store.apply(Changes {
            remove: vec!["seg1.m4s".into()],
            ..Changes::default()
        });
        assert!(store.get("seg1.m4s").is_none());
        assert_eq!(store.edge().version, 2);
    }
}
