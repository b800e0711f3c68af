//! Where the HLS outputs persist their files (`[hls.storage]`): a local
//! directory (the default: what `/hls/` serves once an output has stopped),
//! nowhere (`memory`: viewers are served from the in-memory store only), or
//! an S3-compatible bucket (`s3`: a CDN serves viewers from it, and several
//! gateway nodes can write to it).
//!
//! A backend implements [`Storage`]: put a file, delete one, clear an
//! output's files at its start. Names are relative to the output's
//! directory; in a bucket the key is `{prefix}/{path under DATA_DIR/hls}/{name}`,
//! the URL path under `/hls/`. [`Uploader`] adds what every backend gets:
//! retries with backoff, a bounded number of times, then the operation is
//! dropped with a warning, all counted in the metrics.
//!
//! The backend is chosen once per process by [`install`] (at server start);
//! an output asks [`open`] for its directory's uploader. Without `install`
//! (unit tests) outputs write to their local directory, as before.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::path::{Component, Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as ObjectPath;
use object_store::{
    Attribute, Attributes, ClientConfigKey, ObjectStore, PutOptions, PutPayload, RetryConfig,
};

use crate::config::{StorageConfig, StorageKind};
use crate::telemetry;

/// First wait before a failed operation is tried again; it doubles each time.
const BACKOFF: Duration = Duration::from_millis(250);
/// Longest wait between two tries.
const MAX_BACKOFF: Duration = Duration::from_secs(4);
/// Longest an S3 request may take (a segment is a few MB at most), and its
/// connection (humantime).
const S3_TIMEOUT: &str = "20s";
const S3_CONNECT_TIMEOUT: &str = "5s";

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    ObjectStore(#[from] object_store::Error),
    #[error("invalid object key: {0}")]
    Key(#[from] object_store::path::Error),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StorageError + '_ {
    move |source| StorageError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What a backend's operations return.
pub type StorageFuture<'a> = Pin<Box<dyn Future<Output = Result<(), StorageError>> + Send + 'a>>;

/// One output's files, wherever they are kept. `name` is a file name
/// relative to the output (`index.m3u8`, `seg12.ts`).
pub trait Storage: Send + Sync {
    /// The backend's name in metrics and logs.
    fn kind(&self) -> &'static str;
    /// Stores `data` as `name`, replacing what was there; readers never see
    /// half of it.
    fn put<'a>(&'a self, name: &'a str, data: Bytes) -> StorageFuture<'a>;
    /// Deletes `name`; one that is not there is no error.
    fn delete<'a>(&'a self, name: &'a str) -> StorageFuture<'a>;
    /// Removes everything an earlier run of the output left.
    fn clear(&self) -> StorageFuture<'_>;
    /// The output is done: removes what the backend kept for its own use.
    fn finish(&self) -> StorageFuture<'_> {
        Box::pin(async { Ok(()) })
    }
}

/// Files in a local directory, each written under a hidden name and renamed
/// into place, so readers never see half a file.
///
/// Deleted files are not unlinked but renamed to hidden spares, and a later
/// write goes into a spare (truncated) rather than a new file; a replaced
/// file (the playlist) is swapped with its successor (`RENAME_EXCHANGE`)
/// and becomes a spare in turn. Creating a file takes a new inode, which on
/// ext4 without a journal means a scan for one not recently freed: at a
/// hundred streams, creating and deleting segments and playlists was a tenth
/// of the server's CPU. A spare is written over only [`SPARE_AGE`] after it
/// was retired, so a reader still holding it open (a slow download of a
/// segment that left the playlist) reads what it opened. Spares are removed
/// when the output finishes, and by [`Storage::clear`] at the next start.
pub struct LocalDir {
    dir: PathBuf,
    spares: Arc<Mutex<Spares>>,
    spare_age: Duration,
}

/// How long a retired file waits before it is written over.
const SPARE_AGE: Duration = Duration::from_secs(10);
/// Spares kept per directory; more are unlinked. A directory retires about
/// two files per segment (the deleted segment, the replaced playlist), so
/// this covers [`SPARE_AGE`] of 1 s segments.
const MAX_SPARES: usize = 24;

/// A directory's spare files, oldest first, with when each was retired,
/// and the names written there and not deleted since.
#[derive(Default)]
struct Spares {
    files: VecDeque<(PathBuf, Instant)>,
    next: u64,
    present: HashSet<String>,
}

impl Spares {
    fn new_name(&mut self, dir: &Path) -> PathBuf {
        self.next += 1;
        dir.join(format!(".spare-{}", self.next))
    }

    /// A spare old enough to be written over, or a new hidden name.
    fn take(&mut self, dir: &Path, age: Duration) -> PathBuf {
        match self.files.front() {
            Some((_, retired)) if retired.elapsed() >= age => self.files.pop_front().map(|f| f.0),
            _ => None,
        }
        .unwrap_or_else(|| self.new_name(dir))
    }

    /// Keeps `file` as a spare; returns one to unlink when there are too many.
    fn keep(&mut self, file: PathBuf) -> Option<PathBuf> {
        self.files.push_back((file, Instant::now()));
        (self.files.len() > MAX_SPARES)
            .then(|| self.files.pop_front().map(|f| f.0))
            .flatten()
    }
}

impl LocalDir {
    pub fn new(dir: PathBuf) -> Self {
        Self::with_spare_age(dir, SPARE_AGE)
    }

    fn with_spare_age(dir: PathBuf, spare_age: Duration) -> Self {
        LocalDir {
            dir,
            spares: Arc::default(),
            spare_age,
        }
    }

    /// Runs `f` on the blocking pool with the directory and its spares.
    async fn blocking(
        &self,
        f: impl FnOnce(&Path, &Mutex<Spares>) -> Result<(), StorageError> + Send + 'static,
    ) -> Result<(), StorageError> {
        let (dir, spares) = (self.dir.clone(), self.spares.clone());
        tokio::task::spawn_blocking(move || f(&dir, &spares))
            .await
            .map_err(|e| io(&self.dir)(std::io::Error::other(e)))?
    }
}

fn lock(spares: &Mutex<Spares>) -> std::sync::MutexGuard<'_, Spares> {
    spares.lock().unwrap_or_else(|p| p.into_inner())
}

/// Writes `data` into a spare (or a new hidden file) and moves it to `name`.
fn put_file(
    dir: &Path,
    spares: &Mutex<Spares>,
    age: Duration,
    name: &str,
    data: &[u8],
) -> Result<(), StorageError> {
    let path = dir.join(name);
    let (tmp, replacing) = {
        let mut spares = lock(spares);
        (spares.take(dir, age), spares.present.contains(name))
    };
    let written = std::fs::write(&tmp, data)
        .map_err(io(&tmp))
        .and_then(|()| swap_in(&tmp, &path, replacing).map_err(io(&path)));
    match written {
        Ok(swapped) => {
            lock(spares).present.insert(name.to_owned());
            // `tmp` now holds the file `name` had.
            if swapped {
                retire(spares, tmp);
            }
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Keeps `file` as a spare, unlinking the oldest when there are too many.
fn retire(spares: &Mutex<Spares>, file: PathBuf) {
    let extra = lock(spares).keep(file);
    if let Some(extra) = extra {
        let _ = std::fs::remove_file(extra);
    }
}

/// Moves `tmp` to `path` atomically. When `replacing` (a file is expected
/// at `path`), swaps the two where the file system can, and returns true:
/// `tmp` then holds the file `path` had.
fn swap_in(tmp: &Path, path: &Path, replacing: bool) -> std::io::Result<bool> {
    #[cfg(not(target_os = "linux"))]
    let _ = replacing;
    #[cfg(target_os = "linux")]
    if replacing {
        use rustix::fs::{CWD, RenameFlags, renameat_with};
        use rustix::io::Errno;
        match renameat_with(CWD, tmp, CWD, path, RenameFlags::EXCHANGE) {
            Ok(()) => return Ok(true),
            // Nothing at `path` yet, or a file system that cannot swap.
            Err(Errno::NOENT | Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP) => {}
            Err(e) => return Err(e.into()),
        }
    }
    std::fs::rename(tmp, path).map(|()| false)
}

/// Retires `name` as a spare, or unlinks it when there are enough.
fn delete_file(dir: &Path, spares: &Mutex<Spares>, name: &str) -> Result<(), StorageError> {
    let path = dir.join(name);
    let spare = {
        let mut spares = lock(spares);
        (spares.files.len() < MAX_SPARES).then(|| spares.new_name(dir))
    };
    let result = match &spare {
        Some(spare) => std::fs::rename(&path, spare),
        None => std::fs::remove_file(&path),
    };
    lock(spares).present.remove(name);
    match result {
        Ok(()) => {
            if let Some(spare) = spare {
                retire(spares, spare);
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(&path)(e)),
    }
}

impl Storage for LocalDir {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn put<'a>(&'a self, name: &'a str, data: Bytes) -> StorageFuture<'a> {
        let (name, age) = (name.to_owned(), self.spare_age);
        Box::pin(self.blocking(move |dir, spares| put_file(dir, spares, age, &name, &data)))
    }

    fn delete<'a>(&'a self, name: &'a str) -> StorageFuture<'a> {
        let name = name.to_owned();
        Box::pin(self.blocking(move |dir, spares| delete_file(dir, spares, &name)))
    }

    fn clear(&self) -> StorageFuture<'_> {
        Box::pin(async move {
            {
                let mut spares = lock(&self.spares);
                spares.files.clear();
                spares.present.clear();
            }
            match tokio::fs::remove_dir_all(&self.dir).await {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(io(&self.dir)(e));
                }
                _ => {}
            }
            tokio::fs::create_dir_all(&self.dir)
                .await
                .map_err(io(&self.dir))
        })
    }

    fn finish(&self) -> StorageFuture<'_> {
        Box::pin(self.blocking(|_, spares| {
            for (file, _) in lock(spares).files.drain(..) {
                let _ = std::fs::remove_file(file);
            }
            Ok(())
        }))
    }
}

/// Nothing persisted: the output's in-memory store is all viewers get.
pub struct Memory;

impl Storage for Memory {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn put<'a>(&'a self, _: &'a str, _: Bytes) -> StorageFuture<'a> {
        Box::pin(async { Ok(()) })
    }

    fn delete<'a>(&'a self, _: &'a str) -> StorageFuture<'a> {
        Box::pin(async { Ok(()) })
    }

    fn clear(&self) -> StorageFuture<'_> {
        Box::pin(async { Ok(()) })
    }
}

/// Objects under one key prefix of an S3-compatible bucket, with the
/// `Content-Type` and `Cache-Control` `/hls/` would answer.
pub struct ObjectStorage {
    store: Arc<dyn ObjectStore>,
    base: ObjectPath,
}

impl ObjectStorage {
    /// The objects under `base` (`prefix/stream`, no leading or trailing `/`).
    pub fn new(store: Arc<dyn ObjectStore>, base: &str) -> Result<Self, StorageError> {
        Ok(ObjectStorage {
            store,
            base: ObjectPath::parse(base)?,
        })
    }

    fn key(&self, name: &str) -> Result<ObjectPath, StorageError> {
        Ok(ObjectPath::parse(format!("{}/{name}", self.base))?)
    }
}

impl Storage for ObjectStorage {
    fn kind(&self) -> &'static str {
        "s3"
    }

    fn put<'a>(&'a self, name: &'a str, data: Bytes) -> StorageFuture<'a> {
        Box::pin(async move {
            let key = self.key(name)?;
            let mut attributes = Attributes::new();
            if let Some((content_type, cache)) = crate::http::hls::file_headers(name) {
                attributes.insert(Attribute::ContentType, content_type.into());
                attributes.insert(Attribute::CacheControl, cache.into());
            }
            let opts = PutOptions {
                attributes,
                ..Default::default()
            };
            self.store
                .put_opts(&key, PutPayload::from(data), opts)
                .await?;
            Ok(())
        })
    }

    fn delete<'a>(&'a self, name: &'a str) -> StorageFuture<'a> {
        Box::pin(async move {
            let key = self.key(name)?;
            let keys = futures_util::stream::iter([Ok(key)]).boxed();
            self.store
                .delete_stream(keys)
                .try_collect::<Vec<_>>()
                .await?;
            Ok(())
        })
    }

    fn clear(&self) -> StorageFuture<'_> {
        Box::pin(async move {
            let keys = self
                .store
                .list(Some(&self.base))
                .map_ok(|meta| meta.location)
                .boxed();
            self.store
                .delete_stream(keys)
                .try_collect::<Vec<_>>()
                .await?;
            Ok(())
        })
    }
}

/// The S3 client for `config` (`kind = "s3"`, validated): credentials and
/// region from the config, else from the `AWS_*` environment variables.
pub fn s3_client(config: &StorageConfig) -> Result<AmazonS3, StorageError> {
    let mut builder = AmazonS3Builder::from_env()
        .with_bucket_name(config.bucket.clone().unwrap_or_default())
        .with_allow_http(config.allow_http)
        // Retries are ours (counted); a request is one try.
        .with_retry(RetryConfig {
            max_retries: 0,
            ..Default::default()
        })
        // Set one by one: `with_client_options` would drop `allow_http` and
        // the client settings from the environment.
        .with_config(
            AmazonS3ConfigKey::Client(ClientConfigKey::Timeout),
            S3_TIMEOUT,
        )
        .with_config(
            AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout),
            S3_CONNECT_TIMEOUT,
        );
    if let Some(endpoint) = &config.endpoint {
        builder = builder.with_endpoint(endpoint);
    }
    if let Some(region) = &config.region {
        builder = builder.with_region(region);
    }
    if let Some(key) = &config.access_key_id {
        builder = builder.with_access_key_id(key);
    }
    if let Some(secret) = &config.secret_access_key {
        builder = builder.with_secret_access_key(secret);
    }
    Ok(builder.build()?)
}

/// Runs a backend's operations for one output: each is tried again after
/// a failure, with a doubling wait, `retries` times, then given up.
#[derive(Clone)]
pub struct Uploader {
    storage: Arc<dyn Storage>,
    retries: u32,
}

impl Uploader {
    pub fn new(storage: Arc<dyn Storage>, retries: u32) -> Self {
        Uploader { storage, retries }
    }

    pub fn kind(&self) -> &'static str {
        self.storage.kind()
    }

    /// Stores `data` as `name`; false when every try failed.
    pub async fn put(&self, name: &str, data: Bytes, span: &tracing::Span) -> bool {
        self.run("put", name, span, || self.storage.put(name, data.clone()))
            .await
    }

    /// Deletes `name`; false when every try failed.
    pub async fn delete(&self, name: &str, span: &tracing::Span) -> bool {
        self.run("delete", name, span, || self.storage.delete(name))
            .await
    }

    /// Removes what an earlier run left; false when every try failed.
    pub async fn clear(&self, span: &tracing::Span) -> bool {
        self.run("clear", "", span, || self.storage.clear()).await
    }

    /// The output is done: the backend tidies up (tried once).
    pub async fn finish(&self, span: &tracing::Span) {
        if let Err(e) = self.storage.finish().await {
            tracing::debug!(parent: span, error = %e, "storage finish failed");
        }
    }

    async fn run<'f>(
        &self,
        op: &'static str,
        name: &str,
        span: &tracing::Span,
        mut attempt: impl FnMut() -> StorageFuture<'f>,
    ) -> bool {
        let backend = self.kind();
        let mut wait = BACKOFF;
        let mut tries = 0;
        loop {
            tries += 1;
            let Err(error) = attempt().await else {
                return true;
            };
            if tries > self.retries {
                telemetry::storage_errors(backend, op).increment(1);
                tracing::warn!(parent: span, backend, op, file = name, tries, error = %error, "HLS storage operation failed; given up");
                return false;
            }
            telemetry::storage_retries(backend, op).increment(1);
            tracing::debug!(parent: span, backend, op, file = name, error = %error, "HLS storage operation failed; trying again");
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(MAX_BACKOFF);
        }
    }
}

/// The process's backend: chosen by [`install`].
struct Installed {
    kind: StorageKind,
    retries: u32,
    /// `DATA_DIR/hls`: output directories are named relative to it.
    root: PathBuf,
    /// The bucket client and key prefix, for `s3`.
    s3: Option<(Arc<dyn ObjectStore>, String)>,
}

static INSTALLED: RwLock<Option<Arc<Installed>>> = RwLock::new(None);

/// Chooses where every output of this process stores its files. `root` is
/// `DATA_DIR/hls`, the directory output directories are under.
pub fn install(config: &StorageConfig, root: PathBuf) -> Result<(), StorageError> {
    let s3 = match config.kind {
        StorageKind::S3 => {
            let client: Arc<dyn ObjectStore> = Arc::new(s3_client(config)?);
            Some((client, config.prefix.trim_matches('/').to_owned()))
        }
        StorageKind::Local | StorageKind::Memory => None,
    };
    let installed = Installed {
        kind: config.kind,
        retries: config.retries,
        root,
        s3,
    };
    *INSTALLED.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(installed));
    Ok(())
}

/// The uploader of the output whose files belong in `dir` (under
/// `DATA_DIR/hls`, e.g. `DATA_DIR/hls/cam`).
pub fn open(dir: &Path) -> Result<Uploader, StorageError> {
    let installed = INSTALLED.read().unwrap_or_else(|e| e.into_inner()).clone();
    let Some(installed) = installed else {
        return Ok(Uploader::new(Arc::new(LocalDir::new(dir.to_owned())), 3));
    };
    let storage: Arc<dyn Storage> = match (&installed.kind, &installed.s3) {
        (StorageKind::S3, Some((client, prefix))) => {
            let relative = relative_key(&installed.root, dir);
            let base = [prefix.as_str(), relative.as_str()]
                .iter()
                .filter(|p| !p.is_empty())
                .copied()
                .collect::<Vec<_>>()
                .join("/");
            Arc::new(ObjectStorage::new(client.clone(), &base)?)
        }
        (StorageKind::Memory, _) => Arc::new(Memory),
        _ => Arc::new(LocalDir::new(dir.to_owned())),
    };
    Ok(Uploader::new(storage, installed.retries))
}

/// `dir` under `root` as a `/`-separated key (`cam`, `cam/720p`); a
/// directory elsewhere is known by its last component.
fn relative_key(root: &Path, dir: &Path) -> String {
    let relative = dir.strip_prefix(root).unwrap_or_else(|_| {
        dir.file_name()
            .map(Path::new)
            .unwrap_or_else(|| Path::new(""))
    });
    relative
        .components()
        .filter_map(|c| match c {
            Component::Normal(part) => Some(part.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::ObjectStoreExt;

    fn span() -> tracing::Span {
        tracing::Span::none()
    }

    #[tokio::test]
    async fn local_dir_writes_whole_files_removes_them_and_clears() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("hls/cam");
        let up = Uploader::new(Arc::new(LocalDir::new(dir.clone())), 0);
        assert!(up.clear(&span()).await, "clear creates the directory");
        assert!(dir.is_dir());
        assert!(up.put("seg0.ts", Bytes::from_static(b"ts"), &span()).await);
        assert!(
            up.put("index.m3u8", Bytes::from_static(b"#EXTM3U\n"), &span())
                .await
        );
        assert_eq!(std::fs::read(dir.join("seg0.ts")).unwrap(), b"ts");
        assert!(
            up.put("index.m3u8", Bytes::from_static(b"#EXTM3U\n2"), &span())
                .await
        );
        assert_eq!(
            std::fs::read(dir.join("index.m3u8")).unwrap(),
            b"#EXTM3U\n2"
        );
        // Besides the spares, no temporary file is left.
        assert_eq!(visible(&dir), ["index.m3u8", "seg0.ts"]);
        assert!(up.delete("seg0.ts", &span()).await);
        assert!(!dir.join("seg0.ts").exists());
        assert!(
            up.delete("seg0.ts", &span()).await,
            "a missing file is no error"
        );
        assert!(up.clear(&span()).await);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    }

    /// The names in `dir`, sorted, without the hidden ones.
    fn visible(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        names
    }

    /// Puts `data` as `name` through `uploader`, which must succeed.
    async fn put(uploader: &Uploader, name: &str, data: &'static [u8]) {
        assert!(
            uploader.put(name, Bytes::from_static(data), &span()).await,
            "put {name}"
        );
    }

    fn inode(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).unwrap().ino()
    }

    #[tokio::test]
    async fn local_dir_writes_over_retired_files_once_they_are_old_enough() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cam");
        let reuse = Uploader::new(
            Arc::new(LocalDir::with_spare_age(dir.clone(), Duration::ZERO)),
            0,
        );
        assert!(reuse.clear(&span()).await);
        put(&reuse, "seg0.ts", b"first segment").await;
        let seg0 = inode(&dir.join("seg0.ts"));
        assert!(reuse.delete("seg0.ts", &span()).await);
        assert!(!dir.join("seg0.ts").exists());
        // The next file is the deleted one's inode, truncated and rewritten.
        put(&reuse, "seg1.ts", b"2nd").await;
        assert_eq!(inode(&dir.join("seg1.ts")), seg0);
        assert_eq!(std::fs::read(dir.join("seg1.ts")).unwrap(), b"2nd");
        // A replaced playlist's file becomes a spare too.
        put(&reuse, "index.m3u8", b"#EXTM3U\n1").await;
        let playlist = inode(&dir.join("index.m3u8"));
        put(&reuse, "index.m3u8", b"#EXTM3U\n2").await;
        assert_eq!(
            std::fs::read(dir.join("index.m3u8")).unwrap(),
            b"#EXTM3U\n2"
        );
        put(&reuse, "seg2.ts", b"3rd").await;
        assert_eq!(inode(&dir.join("seg2.ts")), playlist);
        assert_eq!(std::fs::read(dir.join("seg2.ts")).unwrap(), b"3rd");
        reuse.finish(&span()).await;
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            3,
            "no spare is left"
        );

        // A retired file younger than the spare age is left alone: a reader
        // that opened it still reads what it opened.
        let dir = tmp.path().join("cam2");
        let wait = Uploader::new(Arc::new(LocalDir::new(dir.clone())), 0);
        assert!(wait.clear(&span()).await);
        put(&wait, "seg0.ts", b"first segment").await;
        let first = inode(&dir.join("seg0.ts"));
        let mut open = std::fs::File::open(dir.join("seg0.ts")).unwrap();
        assert!(wait.delete("seg0.ts", &span()).await);
        put(&wait, "seg1.ts", b"2nd").await;
        assert_ne!(inode(&dir.join("seg1.ts")), first);
        let mut read = Vec::new();
        std::io::Read::read_to_end(&mut open, &mut read).unwrap();
        assert_eq!(read, b"first segment");
        wait.finish(&span()).await;
        assert_eq!(visible(&dir), ["seg1.ts"]);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    }

    #[tokio::test]
    async fn failures_are_retried_then_given_up_and_counted() {
        let tmp = tempfile::tempdir().unwrap();
        // A file where the directory should be: every write fails.
        let dir = tmp.path().join("blocked");
        std::fs::write(&dir, b"not a directory").unwrap();
        let up = Uploader::new(Arc::new(LocalDir::new(dir)), 2);
        let errors = || {
            let text = telemetry::render();
            text.lines()
                .find(|l| {
                    l.starts_with("whipgate_storage_errors_total{")
                        && l.contains(r#"backend="local""#)
                        && l.contains(r#"op="put""#)
                })
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        let before = errors();
        let started = std::time::Instant::now();
        assert!(!up.put("seg0.ts", Bytes::from_static(b"x"), &span()).await);
        // Two retries: waits of 250 and 500 ms.
        assert!(started.elapsed() >= Duration::from_millis(700));
        assert_eq!(errors() - before, 1.0);
        let text = telemetry::render();
        assert!(
            text.contains(r#"whipgate_storage_retries_total{backend="local",op="put"}"#),
            "{text}"
        );
    }

    #[tokio::test]
    async fn memory_writes_nothing() {
        let up = Uploader::new(Arc::new(Memory), 0);
        assert_eq!(up.kind(), "memory");
        assert!(up.clear(&span()).await);
        assert!(up.put("seg0.ts", Bytes::from_static(b"ts"), &span()).await);
        assert!(up.delete("seg0.ts", &span()).await);
    }

    #[test]
    fn keys_are_the_path_under_the_hls_root() {
        let root = Path::new("/data/hls");
        assert_eq!(relative_key(root, Path::new("/data/hls/cam")), "cam");
        assert_eq!(
            relative_key(root, Path::new("/data/hls/cam/720p")),
            "cam/720p"
        );
        assert_eq!(relative_key(root, Path::new("/elsewhere/cam")), "cam");
    }

    #[tokio::test]
    async fn object_keys_and_headers() {
        let store: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        let s = ObjectStorage::new(store.clone(), "live/cam").unwrap();
        s.put("seg3.ts", Bytes::from_static(b"ts")).await.unwrap();
        s.put("index.m3u8", Bytes::from_static(b"#EXTM3U\n"))
            .await
            .unwrap();
        let other = ObjectStorage::new(store.clone(), "live/cam2").unwrap();
        other
            .put("seg0.ts", Bytes::from_static(b"ts"))
            .await
            .unwrap();
        let headers = |key: &'static str| {
            let store = store.clone();
            async move {
                let got = store.get(&ObjectPath::parse(key).unwrap()).await.unwrap();
                let attr = |a| got.attributes.get(&a).map(|v| v.to_string());
                (attr(Attribute::ContentType), attr(Attribute::CacheControl))
            }
        };
        let (content_type, cache) = headers("live/cam/seg3.ts").await;
        assert_eq!(content_type.as_deref(), Some("video/mp2t"));
        assert!(cache.is_some_and(|c| c.contains("immutable")));
        let (_, cache) = headers("live/cam/index.m3u8").await;
        assert_eq!(cache.as_deref(), Some("no-cache"));
        s.delete("seg3.ts").await.unwrap();
        s.delete("seg3.ts").await.unwrap();
        let left = |prefix: &'static str| {
            let store = store.clone();
            async move {
                store
                    .list(Some(&ObjectPath::parse(prefix).unwrap()))
                    .map_ok(|m| m.location.to_string())
                    .try_collect::<Vec<_>>()
                    .await
                    .unwrap()
            }
        };
        assert_eq!(left("live/cam").await, ["live/cam/index.m3u8"]);
        s.clear().await.unwrap();
        assert!(left("live/cam").await.is_empty());
        assert_eq!(
            left("live").await,
            ["live/cam2/seg0.ts"],
            "other streams stay"
        );
    }
}
