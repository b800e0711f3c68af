//! HLS storage backends end to end: a real publication (`whipgate publish`)
//! whose segments and playlists go to a real S3-compatible server (moto's,
//! from PyPI, installed by scripts/install-deps.sh) or nowhere (`memory`),
//! and an S3 endpoint that does not answer, which must not stop HLS.

mod support;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as Key;
use object_store::{Attribute, ObjectStore, ObjectStoreExt, PutPayload};
use support::server::{
    Server, ffmpeg_decode_errors, ffprobe_streams, free_tcp_port, publish_cli, read_playlist,
    sample_mkv,
};

const BUCKET: &str = "live";

/// moto's S3 server on 127.0.0.1, killed when dropped.
struct Moto {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

/// How to start moto's server: `WHIPGATE_MOTO_SERVER`, else the venv that
/// scripts/install-deps.sh makes when python3 lacks moto, else python3's.
fn moto_command() -> Command {
    if let Some(bin) = std::env::var_os("WHIPGATE_MOTO_SERVER") {
        return Command::new(bin);
    }
    let venv = std::env::var_os("WHIPGATE_MOTO_VENV")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/whipgate/moto")));
    if let Some(bin) = venv
        .map(|v| v.join("bin/moto_server"))
        .filter(|b| b.is_file())
    {
        return Command::new(bin);
    }
    let mut c = Command::new("python3");
    c.args(["-m", "moto.server"]);
    c
}

impl Moto {
    fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("moto.log");
        let port = free_tcp_port();
        let child = moto_command()
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::create(dir.path().join("moto.err"))?)
            .spawn()
            .context("starting moto's S3 server (scripts/install-deps.sh installs it)")?;
        let mut moto = Moto {
            child,
            port,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = moto.child.try_wait()? {
                bail!("moto exited at start ({status}):\n{}", moto.stderr());
            }
            if Instant::now() > deadline {
                bail!("moto did not listen within 30 s:\n{}", moto.stderr());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(moto)
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn stderr(&self) -> String {
        let err = self.log.with_file_name("moto.err");
        std::fs::read_to_string(err).unwrap_or_default()
    }

    /// Creates a bucket (moto takes any credentials).
    async fn create_bucket(&self, name: &str) {
        let resp = reqwest::Client::new()
            .put(format!("{}/{name}", self.endpoint()))
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "creating bucket: {resp:?}");
    }

    fn client(&self, bucket: &str) -> impl ObjectStore {
        AmazonS3Builder::new()
            .with_endpoint(self.endpoint())
            .with_allow_http(true)
            .with_bucket_name(bucket)
            .with_region("us-east-1")
            .with_access_key_id("testing")
            .with_secret_access_key("testing")
            .build()
            .unwrap()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn s3_config(endpoint: &str, retries: u32) -> String {
    format!(
        "[hls]\nsegment_duration = 1.0\nplaylist_size = 3\nkeep_extra = 1\n\
         [hls.storage]\nkind = \"s3\"\nbucket = \"{BUCKET}\"\nendpoint = \"{endpoint}\"\n\
         allow_http = true\nregion = \"us-east-1\"\nprefix = \"gw1\"\nretries = {retries}\n\
         access_key_id = \"testing\"\nsecret_access_key = \"testing\"\n"
    )
}

async fn keys(store: &impl ObjectStore, prefix: &str) -> Vec<String> {
    let mut keys: Vec<String> = store
        .list(Some(&Key::from(prefix)))
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .unwrap();
    keys.sort();
    keys
}

/// The sequence number of `segN.ts`.
fn sequence(name: &str) -> u64 {
    let digits = name.rsplit('/').next().unwrap_or(name);
    digits
        .trim_start_matches("seg")
        .trim_end_matches(".ts")
        .parse()
        .unwrap_or_else(|_| panic!("not a segment: {name}"))
}

/// Publishes 4 s of the sample to `stream`, waits (bounded) until the
/// gateway's playlist has `EXT-X-ENDLIST`, and checks that its HLS ffprobes
/// and decodes cleanly.
async fn publish_and_check_served_hls(server: &Server, stream: &str) {
    publish_cli(
        &sample_mkv(),
        &server.url(&format!("/whip/{stream}")),
        &["--duration", "4"],
        "warn",
        Duration::from_secs(30),
    )
    .await;
    let url = server.url(&format!("/hls/{stream}/index.m3u8"));
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = match http.get(&url).send().await {
            Ok(r) if r.status().is_success() => r.text().await.unwrap_or_default(),
            _ => String::new(),
        };
        if text.contains("#EXT-X-ENDLIST") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no ended playlist at {url}: {text}\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    check_media(&url);
}

/// The HLS at `input` (URL or file) has H264 and AAC and decodes cleanly.
fn check_media(input: &str) {
    let codecs: Vec<String> = ffprobe_streams(input)
        .unwrap()
        .into_iter()
        .map(|s| s.codec)
        .collect();
    assert_eq!(codecs, ["h264", "aac"], "{input}");
    let errors = ffmpeg_decode_errors(input).unwrap();
    assert!(
        errors.trim().is_empty(),
        "decode errors in {input}:\n{errors}"
    );
}

/// The value of one metric series (`name{labels}` exactly), 0 when absent.
async fn metric(server: &Server, series: &str) -> f64 {
    let text = reqwest::get(server.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_and_playlists_go_to_an_s3_bucket_and_slide() {
    let moto = Moto::start().unwrap();
    moto.create_bucket(BUCKET).await;
    let s3 = moto.client(BUCKET);
    // What an earlier run left is cleared when the output starts.
    s3.put(
        &Key::from("gw1/file/seg999.ts"),
        PutPayload::from_static(b"old"),
    )
    .await
    .unwrap();
    s3.put(
        &Key::from("gw1/other/seg0.ts"),
        PutPayload::from_static(b"x"),
    )
    .await
    .unwrap();
    let server = Server::start(&s3_config(&moto.endpoint(), 3)).unwrap();
    publish_cli(
        &sample_mkv(),
        &server.url("/whip/file"),
        &[],
        "warn",
        Duration::from_secs(40),
    )
    .await;

    // The bucket's playlist ends once the last segment is uploaded.
    let playlist_key = Key::from("gw1/file/index.m3u8");
    let deadline = Instant::now() + Duration::from_secs(30);
    let playlist = loop {
        if let Ok(got) = s3.get(&playlist_key).await {
            let content_type = got.attributes.get(&Attribute::ContentType).cloned();
            let cache = got.attributes.get(&Attribute::CacheControl).cloned();
            let text = String::from_utf8(got.bytes().await.unwrap().to_vec()).unwrap();
            if text.contains("#EXT-X-ENDLIST") {
                assert_eq!(
                    content_type.as_deref(),
                    Some("application/vnd.apple.mpegurl")
                );
                assert_eq!(cache.as_deref(), Some("no-cache"));
                break text;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no ended playlist in the bucket: {:?}\n{}",
            keys(&s3, "gw1").await,
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // Download the playlist and its segments; ffprobe and decode them there.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("index.m3u8"), &playlist).unwrap();
    let listed = read_playlist(&tmp.path().join("index.m3u8")).unwrap();
    assert!(listed.ended);
    assert_eq!(listed.segments.len(), 3, "{playlist}");
    for (uri, _) in &listed.segments {
        let got = s3
            .get(&Key::from(format!("gw1/file/{uri}")))
            .await
            .unwrap_or_else(|e| panic!("{uri} listed but not in the bucket: {e}"));
        assert_eq!(
            got.attributes
                .get(&Attribute::ContentType)
                .map(|v| v.as_ref()),
            Some("video/mp2t")
        );
        assert!(
            got.attributes
                .get(&Attribute::CacheControl)
                .is_some_and(|v| v.contains("immutable"))
        );
        std::fs::write(tmp.path().join(uri), got.bytes().await.unwrap()).unwrap();
    }
    let local = tmp.path().join("index.m3u8").display().to_string();
    check_media(&local);

    // The window slid over ~10 one-second segments: only the listed ones
    // and `keep_extra` (1) more are left; the first and the stale one are gone.
    let stored = keys(&s3, "gw1/file").await;
    let segments: Vec<&String> = stored.iter().filter(|k| k.ends_with(".ts")).collect();
    let first_listed = sequence(&listed.segments[0].0);
    assert!(first_listed >= 6, "{playlist}");
    assert!(
        segments.len() <= 4 && segments.iter().all(|k| sequence(k) + 1 >= first_listed),
        "old segments left in the bucket: {stored:?}"
    );
    assert_eq!(stored.len(), segments.len() + 1, "{stored:?}");
    assert_eq!(keys(&s3, "gw1/other").await, ["gw1/other/seg0.ts"]);

    // Nothing went to the local data directory, nothing failed.
    assert!(!server.hls_dir("file").join("index.m3u8").exists());
    let errors = r#"whipgate_storage_errors_total{backend="s3",op="put"}"#;
    assert_eq!(metric(&server, errors).await, 0.0);
    assert!(!server.log().contains("panicked"), "{}", server.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_bucket_is_retried_counted_and_hls_still_serves() {
    // Nothing listens there: every upload fails at once.
    let endpoint = format!("http://127.0.0.1:{}", free_tcp_port());
    let server = Server::start(&s3_config(&endpoint, 1)).unwrap();
    publish_and_check_served_hls(&server, "dead").await;
    let errors = r#"whipgate_storage_errors_total{backend="s3",op="put"}"#;
    let retries = r#"whipgate_storage_retries_total{backend="s3",op="put"}"#;
    // Each upload of the playlist and of every segment failed twice (one
    // retry); the writer may still be working through the last ones.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut failed = metric(&server, errors).await;
    while failed < 4.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        failed = metric(&server, errors).await;
    }
    assert!(failed >= 4.0, "{failed} upload errors counted");
    assert!(metric(&server, retries).await >= failed);
    let clear = r#"whipgate_storage_errors_total{backend="s3",op="clear"}"#;
    assert_eq!(metric(&server, clear).await, 1.0);
    assert!(
        server
            .log()
            .contains("HLS storage operation failed; given up"),
        "{}",
        server.log()
    );
    assert!(!server.log().contains("panicked"), "{}", server.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_storage_serves_hls_and_writes_no_file() {
    let server = Server::start("[hls.storage]\nkind = \"memory\"\n").unwrap();
    publish_and_check_served_hls(&server, "mem").await;
    let hls = server.dir.path().join("data/hls");
    let files: Vec<_> = walk(&hls);
    assert!(files.is_empty(), "files written: {files:?}");
    assert!(!server.log().contains("panicked"), "{}", server.log());
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .flat_map(|e| {
            let path = e.path();
            if path.is_dir() {
                walk(&path)
            } else {
                vec![path]
            }
        })
        .collect()
}
