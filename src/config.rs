//! One configuration: the embedded default, a TOML file on top, then
//! environment variables and flags on top of that. Unknown keys are refused
//! (`deny_unknown_fields`) and [`Config::validate`] checks values, so a typo
//! stops the server at start with a message naming the key.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The configuration the server runs on when no file is given.
pub const DEFAULT_TOML: &str = include_str!("default.toml");

/// `server.presets_dir` unless configured; may be missing.
const DEFAULT_PRESETS_DIR: &str = "./presets";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("invalid value for `{key}`: {message}")]
    Invalid { key: String, message: String },
    /// A preset file (`server.presets_dir`) that does not load.
    #[error(transparent)]
    Preset(#[from] crate::preset::PresetError),
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub webrtc: WebRtcConfig,
    #[serde(default)]
    pub hls: HlsConfig,
    #[serde(default)]
    pub rtmp: RtmpConfig,
    /// Several nodes: redirects (307) to the least-loaded peer or per
    /// stream pattern.
    #[serde(default)]
    pub cluster: ClusterConfig,
    /// Who may publish beyond each stream's own tokens: tokens for every
    /// stream, JWT, an HTTP callback.
    #[serde(default)]
    pub auth: AuthConfig,
    /// Settings for any stream name not listed under `[streams.NAME]`.
    #[serde(default)]
    pub stream_defaults: StreamConfig,
    #[serde(default)]
    pub streams: BTreeMap<String, StreamConfig>,
    /// The shipped presets and those of `server.presets_dir`, loaded by
    /// [`Config::load`] (the shipped ones only for a parsed config).
    #[serde(skip)]
    pub presets: crate::preset::Presets,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// HTTP listen address (WHIP, HLS).
    pub http_listen: SocketAddr,
    /// Directory for HLS segments and playlists.
    pub data_dir: PathBuf,
    /// Largest accepted request body (SDP offers), bytes.
    pub max_body_bytes: usize,
    /// Publishers allowed at once (503 beyond).
    pub max_sessions: usize,
    /// Bearer token for the HTTP API (`/api/v1/`). Without one the API only
    /// answers clients on loopback.
    pub api_token: Option<String>,
    /// HTTPS listen address, used when a certificate is configured
    /// (`tls_cert` + `tls_key`) or `tls_self_signed` is on.
    pub https_listen: SocketAddr,
    /// PEM certificate chain for HTTPS (reloaded on SIGHUP).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Development mode: serve HTTPS with a generated self-signed
    /// certificate for localhost, 127.0.0.1 and `webrtc.public_addresses`.
    pub tls_self_signed: bool,
    /// Per-client-IP rate of WHIP `POST`, `PATCH` and `DELETE`.
    pub rate_limit: RateLimitConfig,
    /// HTTP(S) connections served at once (each listener); more wait.
    pub max_connections: usize,
    /// Preset files (`NAME.toml`) that add to or replace the shipped ones.
    pub presets_dir: PathBuf,
    /// Streams created or changed through the API (`PUT
    /// /api/v1/streams/NAME`), kept across restarts; default
    /// `DATA_DIR/streams.json`.
    pub state_file: Option<PathBuf>,
}

/// A token bucket per client IP address over WHIP `POST`, `PATCH` and
/// `DELETE`: `burst` requests at once, refilled at `per_second`; beyond,
/// 429 with `Retry-After`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Sustained requests per second per IP; 0 turns the limit off.
    pub per_second: f64,
    /// Requests an IP may make at once.
    pub burst: u32,
    /// Loopback clients (a local reverse proxy, load tests) are not limited.
    pub exempt_loopback: bool,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            per_second: 5.0,
            burst: 30,
            exempt_loopback: true,
        }
    }
}

/// Scale-out. Publishers `POST` to any node; a node sends the offer with a
/// `307` to the peer with the lowest load (sessions / max_sessions) when
/// that is lower than its own, or to the URL of the first route whose
/// pattern the stream matches.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Base URLs of the other nodes (`http://10.0.0.2:8080`), as publishers
    /// reach them. Each is asked for its load at `/cluster/load`.
    pub peers: Vec<String>,
    /// Seconds between two loads asked of each peer.
    pub poll_interval: f64,
    /// Streams sent elsewhere by name, first match wins.
    pub routes: Vec<ClusterRoute>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            peers: Vec::new(),
            poll_interval: 1.0,
            routes: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterRoute {
    /// A stream name, `*` standing for any run of characters.
    pub pattern: String,
    /// The WHIP URL to send the offer to; `{stream}` becomes the name.
    pub url: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            http_listen: "0.0.0.0:8080".parse().expect("static address"),
            data_dir: PathBuf::from("./data"),
            max_body_bytes: 64 * 1024,
            max_sessions: 500,
            api_token: None,
            https_listen: "0.0.0.0:8443".parse().expect("static address"),
            tls_cert: None,
            tls_key: None,
            tls_self_signed: false,
            rate_limit: RateLimitConfig::default(),
            max_connections: 4096,
            presets_dir: PathBuf::from(DEFAULT_PRESETS_DIR),
            state_file: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebRtcConfig {
    /// The one UDP socket that serves every WebRTC session.
    pub udp_listen: SocketAddr,
    /// ICE over TCP (RFC 6544) on this address, a fallback for networks
    /// that block UDP: a passive TCP candidate beside each UDP one.
    pub tcp_listen: Option<SocketAddr>,
    /// Addresses put in ICE candidates: public IPs or host names for 1:1 NAT.
    /// Empty: the addresses of the local interfaces (or the listen address
    /// when it is not a wildcard).
    pub public_addresses: Vec<String>,
    /// STUN/TURN servers handed to clients in `Link: rel="ice-server"`.
    pub ice_servers: Vec<IceServer>,
    /// A session whose client sends nothing (no consent, no media) for this
    /// long is closed, seconds.
    pub idle_timeout: f64,
    /// Accept trickle ICE candidates (`PATCH` with
    /// `application/trickle-ice-sdpfrag`) on session resources.
    pub trickle: bool,
}

impl Default for WebRtcConfig {
    fn default() -> Self {
        Self {
            udp_listen: "0.0.0.0:8189".parse().expect("static address"),
            tcp_listen: None,
            public_addresses: Vec::new(),
            ice_servers: Vec::new(),
            idle_timeout: 15.0,
            trickle: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IceServer {
    pub urls: Vec<String>,
    pub username: Option<String>,
    pub credential: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HlsConfig {
    /// Segment target duration, seconds: segments are cut on the first
    /// keyframe at or after it.
    pub segment_duration: f64,
    /// Segments listed in the live playlist.
    pub playlist_size: usize,
    /// Segments kept on disk after they leave the playlist (for players that
    /// are a little behind).
    pub keep_extra: usize,
    /// Container and flavour of the HLS (`streams.NAME.hls.format` overrides
    /// it per stream).
    pub format: HlsFormat,
    /// LL-HLS part target duration (`EXT-X-PART-INF:PART-TARGET`), seconds:
    /// no part is longer, and every video keyframe starts a new part.
    pub part_duration: f64,
    /// Where segments and playlists are persisted (`[hls.storage]`).
    pub storage: StorageConfig,
}

/// `[hls.storage]`: where the HLS outputs persist their files.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub kind: StorageKind,
    /// `s3`: the bucket (it must exist).
    pub bucket: Option<String>,
    /// `s3`: the service's URL (MinIO, Ceph, R2, …); AWS when unset.
    pub endpoint: Option<String>,
    /// `s3`: the region; else `AWS_REGION` / `AWS_DEFAULT_REGION`, else
    /// `us-east-1`.
    pub region: Option<String>,
    /// `s3`: keys are `{prefix}/{stream}/{file}`; empty: `{stream}/{file}`.
    pub prefix: String,
    /// `s3`: credentials; else `AWS_ACCESS_KEY_ID` and
    /// `AWS_SECRET_ACCESS_KEY` from the environment.
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// `s3`: allow an `http://` endpoint (tests, a private network).
    pub allow_http: bool,
    /// Times a failed write or delete is tried again (with a doubling wait
    /// from 0.25 s) before it is dropped.
    pub retries: u32,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            kind: StorageKind::Local,
            bucket: None,
            endpoint: None,
            region: None,
            prefix: String::new(),
            access_key_id: None,
            secret_access_key: None,
            allow_http: false,
            retries: 3,
        }
    }
}

/// `hls.storage.kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    /// Files in `DATA_DIR/hls/{stream}/`, served by `/hls/` after the
    /// stream's output has stopped too.
    #[default]
    Local,
    /// Nothing persisted: viewers get the in-memory segments while the
    /// output runs.
    Memory,
    /// An S3-compatible bucket.
    S3,
}

impl StorageConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let key = |name: &str| format!("hls.storage.{name}");
        if self.retries > 10 {
            return Err(invalid(key("retries"), "must be at most 10"));
        }
        if self.kind != StorageKind::S3 {
            let s3_only = [
                ("bucket", self.bucket.is_some()),
                ("endpoint", self.endpoint.is_some()),
                ("region", self.region.is_some()),
                ("prefix", !self.prefix.is_empty()),
                ("access_key_id", self.access_key_id.is_some()),
                ("secret_access_key", self.secret_access_key.is_some()),
                ("allow_http", self.allow_http),
            ];
            if let Some((name, _)) = s3_only.iter().find(|(_, set)| *set) {
                return Err(invalid(key(name), "is only used with kind = \"s3\""));
            }
            return Ok(());
        }
        let bucket = self.bucket.as_deref().unwrap_or_default();
        let bucket_chars =
            |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || ".-_".contains(c);
        if !(3..=63).contains(&bucket.len()) || !bucket.chars().all(bucket_chars) {
            return Err(invalid(
                key("bucket"),
                "needs a bucket name with kind = \"s3\": 3 to 63 lowercase letters, digits, `.`, `-` or `_`",
            ));
        }
        if let Some(endpoint) = &self.endpoint {
            let url = url::Url::parse(endpoint)
                .map_err(|e| invalid(key("endpoint"), format!("`{endpoint}` is not a URL: {e}")))?;
            match url.scheme() {
                "https" => {}
                "http" if self.allow_http => {}
                "http" => {
                    return Err(invalid(
                        key("endpoint"),
                        "is http://: set hls.storage.allow_http = true to allow unencrypted S3",
                    ));
                }
                other => {
                    return Err(invalid(
                        key("endpoint"),
                        format!("must be an http:// or https:// URL, not {other}:"),
                    ));
                }
            }
        }
        if self.region.as_deref().is_some_and(|r| r.trim().is_empty()) {
            return Err(invalid(key("region"), "must not be empty"));
        }
        let prefix = self.prefix.trim_matches('/');
        if !prefix.is_empty()
            && prefix
                .split('/')
                .any(|p| p.is_empty() || p == "." || p == ".." || p.contains(char::is_control))
        {
            return Err(invalid(
                key("prefix"),
                "must be `/`-separated names, without empty, `.` or `..` parts",
            ));
        }
        if self.access_key_id.is_some() != self.secret_access_key.is_some() {
            return Err(invalid(
                key("access_key_id"),
                "and hls.storage.secret_access_key go together: set both or neither (then the AWS_* environment variables are used)",
            ));
        }
        Ok(())
    }
}

/// What the HLS output writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HlsFormat {
    /// MPEG-TS segments (`segN.ts`), playlist version 3: plays everywhere;
    /// carries no Opus.
    #[default]
    Mpegts,
    /// Fragmented MP4 / CMAF: an init segment (`initN.mp4`, `EXT-X-MAP`) and
    /// `segN.m4s` media segments, playlist version 7; carries Opus too.
    Fmp4,
    /// fMP4 plus Low-Latency HLS: parts of `part_duration`, blocking playlist
    /// reload, preload hints and delta updates.
    Llhls,
}

impl HlsFormat {
    /// Fragmented MP4 segments (`fmp4` and `llhls`).
    pub fn is_fmp4(self) -> bool {
        self != HlsFormat::Mpegts
    }

    pub fn is_low_latency(self) -> bool {
        self == HlsFormat::Llhls
    }
}

/// `[streams.NAME.hls]`: HLS settings of one stream over `[hls]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamHlsConfig {
    /// This stream's format instead of `hls.format`.
    pub format: Option<HlsFormat>,
}

impl Default for HlsConfig {
    fn default() -> Self {
        Self {
            segment_duration: 2.0,
            playlist_size: 6,
            keep_extra: 2,
            format: HlsFormat::Mpegts,
            part_duration: 0.2,
            storage: StorageConfig::default(),
        }
    }
}

impl HlsConfig {
    pub fn target(&self) -> Duration {
        Duration::from_secs_f64(self.segment_duration)
    }

    /// The LL-HLS part target duration.
    pub fn part_target(&self) -> Duration {
        Duration::from_secs_f64(self.part_duration)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !(0.5..=30.0).contains(&self.segment_duration) {
            return Err(invalid(
                "hls.segment_duration",
                "must be between 0.5 and 30 seconds",
            ));
        }
        if !(1..=100).contains(&self.playlist_size) {
            return Err(invalid("hls.playlist_size", "must be between 1 and 100"));
        }
        if !(0.1..=2.0).contains(&self.part_duration)
            || self.part_duration * 2.0 > self.segment_duration
        {
            return Err(invalid(
                "hls.part_duration",
                "must be between 0.1 and 2 seconds and at most half of hls.segment_duration",
            ));
        }
        self.storage.validate()
    }
}

/// What happens when a stream that already has a publisher gets a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Takeover {
    /// 409 while the current publisher sends media; a publisher whose media
    /// stopped (vanished without DELETE) is replaced.
    #[default]
    Stale,
    /// Always 409 while a session exists.
    Never,
    /// The newest publisher always wins.
    Always,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamConfig {
    /// May this stream be published at all.
    pub enabled: bool,
    /// Bearer tokens accepted for publishing (any of them). Empty: no auth.
    pub tokens: Vec<String>,
    /// Preset name (`presets/NAME.toml`).
    pub preset: String,
    pub takeover: Takeover,
    /// RTMP/RTMPS targets every publication is pushed to; `{stream}` is
    /// replaced by the stream name.
    pub push: Vec<String>,
    /// HLS settings of this stream over `[hls]`.
    pub hls: StreamHlsConfig,
}

impl Default for StreamConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            tokens: Vec::new(),
            preset: "passthrough".into(),
            takeover: Takeover::Stale,
            push: Vec::new(),
            hls: StreamHlsConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RtmpConfig {
    /// Extra CA certificates (PEM) trusted for `rtmps://` targets, for
    /// private origins; the system/web roots are always trusted.
    pub ca_file: Option<PathBuf>,
}

/// `[auth]`: publishing authorization on top of `streams.NAME.tokens`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Bearer tokens accepted for every stream.
    pub tokens: Vec<String>,
    /// Signed JSON Web Tokens naming the stream they allow.
    pub jwt: Option<JwtConfig>,
    /// An HTTP service that decides.
    pub callback: Option<CallbackConfig>,
}

/// JWT signature algorithms whipgate verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum JwtAlgorithm {
    HS256,
    RS256,
    ES256,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    pub algorithm: JwtAlgorithm,
    /// Shared secret (HS256).
    pub secret: Option<String>,
    /// PEM public key (RS256: RSA, ES256: P-256).
    pub public_key_file: Option<PathBuf>,
    /// Required `aud` claim, when set.
    pub audience: Option<String>,
    /// Required `iss` claim, when set.
    pub issuer: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`, seconds.
    #[serde(default = "default_jwt_leeway")]
    pub leeway: u64,
}

fn default_jwt_leeway() -> u64 {
    30
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallbackConfig {
    /// `http://` or `https://` URL that gets a JSON POST per publish attempt.
    pub url: String,
    /// Seconds to wait for its answer (503 to the publisher beyond).
    #[serde(default = "default_callback_timeout")]
    pub timeout: f64,
}

fn default_callback_timeout() -> f64 {
    2.0
}

/// Values given on the command line or in the environment; they win over
/// the file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Overrides {
    /// HTTP listen address.
    #[arg(long, env = "WHIPGATE_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// WebRTC UDP listen address.
    #[arg(long, env = "WHIPGATE_UDP_LISTEN")]
    pub udp_listen: Option<SocketAddr>,
    /// ICE-TCP listen address (off unless given here or in the config).
    #[arg(long, env = "WHIPGATE_TCP_LISTEN")]
    pub tcp_listen: Option<SocketAddr>,
    /// Addresses advertised in ICE candidates (comma separated).
    #[arg(long, env = "WHIPGATE_PUBLIC_ADDRESSES", value_delimiter = ',')]
    pub public_address: Vec<String>,
    /// Data directory (HLS output).
    #[arg(long, env = "WHIPGATE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// HTTPS listen address (with a certificate or --tls-self-signed).
    #[arg(long, env = "WHIPGATE_HTTPS_LISTEN")]
    pub https_listen: Option<SocketAddr>,
    /// PEM certificate chain: serve HTTPS too (reloaded on SIGHUP).
    #[arg(long, env = "WHIPGATE_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "WHIPGATE_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Serve HTTPS with a generated self-signed certificate (development).
    #[arg(
        long,
        env = "WHIPGATE_TLS_SELF_SIGNED",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub tls_self_signed: bool,
    /// Directory of preset files adding to or replacing the shipped ones.
    #[arg(long, env = "WHIPGATE_PRESETS_DIR")]
    pub presets_dir: Option<PathBuf>,
}

impl Config {
    /// Loads the embedded default, or `path` when given, applies overrides
    /// and validates.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        let mut config = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                Self::parse(&text, &path.display().to_string())?
            }
            None => Self::parse(DEFAULT_TOML, "embedded default config")?,
        };
        config.apply(overrides);
        config.presets = crate::preset::Presets::load(&config.server.presets_dir)?;
        config.validate()?;
        Ok(config)
    }

    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_owned(),
            message: e.to_string(),
        })
    }

    fn apply(&mut self, o: &Overrides) {
        if let Some(a) = o.http_listen {
            self.server.http_listen = a;
        }
        if let Some(a) = o.udp_listen {
            self.webrtc.udp_listen = a;
        }
        if let Some(a) = o.tcp_listen {
            self.webrtc.tcp_listen = Some(a);
        }
        if !o.public_address.is_empty() {
            self.webrtc.public_addresses = o.public_address.clone();
        }
        if let Some(d) = &o.data_dir {
            self.server.data_dir = d.clone();
        }
        if let Some(a) = o.https_listen {
            self.server.https_listen = a;
        }
        if let Some(c) = &o.tls_cert {
            self.server.tls_cert = Some(c.clone());
        }
        if let Some(k) = &o.tls_key {
            self.server.tls_key = Some(k.clone());
        }
        if o.tls_self_signed {
            self.server.tls_self_signed = true;
        }
        if let Some(d) = &o.presets_dir {
            self.server.presets_dir = d.clone();
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.hls.validate()?;
        if self.server.max_body_bytes < 1024 {
            return Err(invalid("server.max_body_bytes", "must be at least 1024"));
        }
        if let Some(f) = &self.rtmp.ca_file
            && !f.is_file()
        {
            return Err(invalid(
                "rtmp.ca_file",
                format!("{} is not a readable file", f.display()),
            ));
        }
        if self.server.api_token.as_ref().is_some_and(|t| t.len() < 16) {
            return Err(invalid(
                "server.api_token",
                "must be at least 16 characters",
            ));
        }
        self.validate_tls()?;
        self.validate_cluster()?;
        let r = &self.server.rate_limit;
        if !(r.per_second.is_finite() && (0.0..=10_000.0).contains(&r.per_second)) {
            return Err(invalid(
                "server.rate_limit.per_second",
                "must be between 0 (off) and 10000",
            ));
        }
        if r.burst == 0 {
            return Err(invalid("server.rate_limit.burst", "must be at least 1"));
        }
        if self.server.max_connections < 16 {
            return Err(invalid("server.max_connections", "must be at least 16"));
        }
        let presets_dir = &self.server.presets_dir;
        if *presets_dir != Path::new(DEFAULT_PRESETS_DIR) && !presets_dir.is_dir() {
            return Err(invalid(
                "server.presets_dir",
                format!("{} is not a directory", presets_dir.display()),
            ));
        }
        if self.server.max_sessions == 0 {
            return Err(invalid("server.max_sessions", "must be at least 1"));
        }
        if !(1.0..=600.0).contains(&self.webrtc.idle_timeout) {
            return Err(invalid(
                "webrtc.idle_timeout",
                "must be between 1 and 600 seconds",
            ));
        }
        for (i, s) in self.webrtc.ice_servers.iter().enumerate() {
            let key = format!("webrtc.ice_servers[{i}].urls");
            if s.urls.is_empty() {
                return Err(invalid(key, "needs at least one URL"));
            }
            for u in &s.urls {
                let turn = u.starts_with("turn:") || u.starts_with("turns:");
                if !(turn || u.starts_with("stun:") || u.starts_with("stuns:")) {
                    return Err(invalid(
                        &key,
                        format!("`{u}` is not a stun:, stuns:, turn: or turns: URL"),
                    ));
                }
                if turn && (s.username.is_none() || s.credential.is_none()) {
                    return Err(invalid(&key, "TURN servers need username and credential"));
                }
            }
        }
        for (i, a) in self.webrtc.public_addresses.iter().enumerate() {
            if a.parse::<IpAddr>().is_err() && (a.is_empty() || a.contains(char::is_whitespace)) {
                return Err(invalid(
                    format!("webrtc.public_addresses[{i}]"),
                    format!("`{a}` is neither an IP address nor a host name"),
                ));
            }
        }
        let streams = std::iter::once(("stream_defaults".to_owned(), &self.stream_defaults)).chain(
            self.streams
                .iter()
                .map(|(n, s)| (format!("streams.{n}"), s)),
        );
        for (key, s) in streams {
            self.validate_stream(&format!("{key}."), s)?;
        }
        if self.auth.tokens.iter().any(|t| t.len() < 8) {
            return Err(invalid(
                "auth.tokens",
                "tokens must be at least 8 characters",
            ));
        }
        // Builds the verifiers once: keys that cannot be read or parsed,
        // missing secrets and bad callback URLs are named here.
        crate::auth::Auth::new(&self.auth)?;
        for name in self.streams.keys() {
            if !valid_stream_name(name) {
                return Err(invalid(
                    format!("streams.{name}"),
                    "stream names use letters, digits, '-', '_' and '.' (1 to 64)",
                ));
            }
        }
        Ok(())
    }

    /// Checks one stream's settings (from the file or the API); error keys
    /// are `prefix` + the field (`streams.cam.` + `preset`).
    pub fn validate_stream(&self, prefix: &str, s: &StreamConfig) -> Result<(), ConfigError> {
        if s.tokens.iter().any(|t| t.len() < 8) {
            return Err(invalid(
                format!("{prefix}tokens"),
                "tokens must be at least 8 characters",
            ));
        }
        for (i, url) in s.push.iter().enumerate() {
            if let Err(e) = crate::rtmp::target::Target::parse(&url.replace("{stream}", "x")) {
                return Err(invalid(format!("{prefix}push[{i}]"), e.to_string()));
            }
        }
        if self.presets.get(&s.preset).is_none() {
            let available: Vec<_> = self.presets.names().collect();
            return Err(invalid(
                format!("{prefix}preset"),
                format!(
                    "unknown preset `{}` (available: {})",
                    s.preset,
                    available.join(", ")
                ),
            ));
        }
        Ok(())
    }

    /// Where the streams defined through the API are kept.
    pub fn state_file(&self) -> PathBuf {
        self.server
            .state_file
            .clone()
            .unwrap_or_else(|| self.server.data_dir.join("streams.json"))
    }

    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let c = &self.cluster;
        let http_url = |key: &str, u: &str| match url::Url::parse(u) {
            Ok(p) if matches!(p.scheme(), "http" | "https") && p.host().is_some() => Ok(()),
            _ => Err(invalid(
                key,
                format!("`{u}` is not an http:// or https:// URL"),
            )),
        };
        for (i, p) in c.peers.iter().enumerate() {
            http_url(&format!("cluster.peers[{i}]"), p)?;
        }
        if !c.peers.is_empty() && !(0.1..=60.0).contains(&c.poll_interval) {
            return Err(invalid(
                "cluster.poll_interval",
                "must be between 0.1 and 60 seconds",
            ));
        }
        for (i, r) in c.routes.iter().enumerate() {
            if r.pattern.is_empty() {
                return Err(invalid(format!("cluster.routes[{i}].pattern"), "is empty"));
            }
            http_url(
                &format!("cluster.routes[{i}].url"),
                &r.url.replace("{stream}", "s"),
            )?;
        }
        Ok(())
    }

    fn validate_tls(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        match (&s.tls_cert, &s.tls_key) {
            (Some(_), None) => {
                return Err(invalid("server.tls_key", "needed with server.tls_cert"));
            }
            (None, Some(_)) => {
                return Err(invalid("server.tls_cert", "needed with server.tls_key"));
            }
            (Some(cert), Some(key)) => {
                if s.tls_self_signed {
                    return Err(invalid(
                        "server.tls_self_signed",
                        "cannot be combined with server.tls_cert",
                    ));
                }
                crate::tls::load_pem(cert, key).map_err(|e| invalid(e.key, e.message))?;
            }
            (None, None) => {}
        }
        if self.tls().is_some() && s.https_listen == s.http_listen {
            return Err(invalid(
                "server.https_listen",
                "must differ from server.http_listen",
            ));
        }
        Ok(())
    }

    /// Where the HTTPS certificate comes from, when HTTPS is on.
    pub fn tls(&self) -> Option<crate::tls::Source> {
        let s = &self.server;
        if let (Some(cert), Some(key)) = (&s.tls_cert, &s.tls_key) {
            return Some(crate::tls::Source::Files {
                cert: cert.clone(),
                key: key.clone(),
            });
        }
        if !s.tls_self_signed {
            return None;
        }
        let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        for a in &self.webrtc.public_addresses {
            if !names.contains(a) {
                names.push(a.clone());
            }
        }
        Some(crate::tls::Source::SelfSigned { names })
    }

    /// The settings for a stream name.
    pub fn stream(&self, name: &str) -> &StreamConfig {
        self.streams.get(name).unwrap_or(&self.stream_defaults)
    }

    /// The HLS settings of a stream name: `[hls]` with the stream's own
    /// `hls` table over it.
    pub fn hls_for(&self, stream: &str) -> HlsConfig {
        self.hls_with(self.stream(stream))
    }

    /// `[hls]` with the `hls` table of the stream settings `s` over it.
    pub fn hls_with(&self, s: &StreamConfig) -> HlsConfig {
        let mut hls = self.hls.clone();
        if let Some(format) = s.hls.format {
            hls.format = format;
        }
        hls
    }

    /// The preset of a stream name (validated to exist; the shipped
    /// default otherwise).
    pub fn preset(&self, stream: &str) -> std::sync::Arc<crate::preset::Preset> {
        self.preset_with(self.stream(stream))
    }

    /// The preset the stream settings `s` name (the shipped default when
    /// there is no such preset; settings are validated before use).
    pub fn preset_with(&self, s: &StreamConfig) -> std::sync::Arc<crate::preset::Preset> {
        let name = &s.preset;
        match self.presets.get(name) {
            Some(p) => p.clone(),
            None => crate::preset::Presets::shipped()
                .get(crate::preset::DEFAULT_PRESET)
                .cloned()
                .expect("the default preset is shipped"),
        }
    }

    /// IP addresses to put in ICE candidates, resolving host names.
    pub fn candidate_ips(&self) -> Result<Vec<IpAddr>, ConfigError> {
        let mut ips = Vec::new();
        for a in &self.webrtc.public_addresses {
            if let Ok(ip) = a.parse::<IpAddr>() {
                ips.push(ip);
                continue;
            }
            let resolved = (a.as_str(), 0u16)
                .to_socket_addrs()
                .map_err(|e| invalid("webrtc.public_addresses", format!("`{a}`: {e}")))?;
            ips.extend(resolved.map(|s| s.ip()));
        }
        if ips.is_empty() {
            let listen = self.webrtc.udp_listen.ip();
            if listen.is_unspecified() {
                let ifaces = if_addrs::get_if_addrs().unwrap_or_default();
                ips.extend(
                    ifaces
                        .iter()
                        .map(|i| i.ip())
                        .filter(|ip| ip.is_ipv4() == listen.is_ipv4()),
                );
            } else {
                ips.push(listen);
            }
        }
        ips.sort();
        ips.dedup();
        Ok(ips)
    }
}

/// Stream names appear in URLs and file paths: keep them plain.
pub fn valid_stream_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid() {
        let c = Config::load(None, &Overrides::default()).unwrap();
        assert_eq!(c.server.http_listen.port(), 8080);
        assert_eq!(c.webrtc.udp_listen.port(), 8189);
        assert_eq!(c.server.data_dir, PathBuf::from("./data"));
    }

    #[test]
    fn unknown_key_is_named() {
        let e = Config::parse("[hls]\nsegment_duraton = 2.0\n", "test").unwrap_err();
        assert!(e.to_string().contains("segment_duraton"), "{e}");
    }

    #[test]
    fn bad_value_is_named() {
        let c = Config::parse("[hls]\nsegment_duration = 0.1\n", "test").unwrap();
        let e = c.validate().unwrap_err();
        assert!(e.to_string().contains("hls.segment_duration"), "{e}");
        let c = Config::parse("[streams.a]\ntokens = [\"short\"]\n", "t").unwrap();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("streams.a.tokens")
        );
        let c = Config::parse("[[webrtc.ice_servers]]\nurls = [\"http://x\"]\n", "t").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("webrtc.ice_servers[0].urls"), "{e}");
    }

    #[test]
    fn tls_keys_are_named() {
        let c = Config::parse("[server]\ntls_cert = \"/nonexistent/c.pem\"\n", "t").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("server.tls_key"), "{e}");
        let c = Config::parse(
            "[server]\ntls_cert = \"/nonexistent/c.pem\"\ntls_key = \"/nonexistent/k.pem\"\n",
            "t",
        )
        .unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("server.tls_cert") && e.contains("cannot read"),
            "{e}"
        );
        let c = Config::parse("[server]\ntls_self_signed = true\n", "t").unwrap();
        c.validate().unwrap();
        assert!(matches!(
            c.tls(),
            Some(crate::tls::Source::SelfSigned { .. })
        ));
        assert!(
            Config::load(None, &Overrides::default())
                .unwrap()
                .tls()
                .is_none()
        );
    }

    #[test]
    fn overrides_win() {
        let o = Overrides {
            http_listen: Some("127.0.0.1:9000".parse().unwrap()),
            public_address: vec!["203.0.113.7".into()],
            ..Default::default()
        };
        let c = Config::load(None, &o).unwrap();
        assert_eq!(c.server.http_listen.port(), 9000);
        assert_eq!(
            c.candidate_ips().unwrap(),
            vec!["203.0.113.7".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn per_stream_settings_and_defaults() {
        let c = Config::parse(
            "[stream_defaults]\ntokens = [\"default-token\"]\n[streams.cam]\ntokens = [\"camtoken1\"]\n",
            "t",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.stream("cam").tokens, vec!["camtoken1"]);
        assert_eq!(c.stream("other").tokens, vec!["default-token"]);
    }

    #[test]
    fn hls_storage_kinds_and_their_errors() {
        let c = Config::parse("", "t").unwrap();
        c.validate().unwrap();
        assert_eq!(c.hls.storage.kind, StorageKind::Local);
        assert_eq!(c.hls.storage.retries, 3);
        let c = Config::parse(DEFAULT_TOML, "t").unwrap();
        assert_eq!(c.hls.storage, StorageConfig::default());
        let c = Config::parse("[hls.storage]\nkind = \"memory\"\n", "t").unwrap();
        c.validate().unwrap();
        assert_eq!(c.hls.storage.kind, StorageKind::Memory);
        let s3 = [
            "[hls.storage]",
            "kind = \"s3\"",
            "bucket = \"live\"",
            "endpoint = \"http://127.0.0.1:9000\"",
            "allow_http = true",
            "region = \"eu-west-1\"",
            "prefix = \"/a/b/\"",
            "access_key_id = \"id\"",
            "secret_access_key = \"secret\"",
        ]
        .join("\n");
        let c = Config::parse(&s3, "t").unwrap();
        c.validate().unwrap();
        assert_eq!(c.hls.storage.kind, StorageKind::S3);
        assert_eq!(c.hls.storage.bucket.as_deref(), Some("live"));
        crate::hls::storage::s3_client(&c.hls.storage).unwrap();

        let e = Config::parse("[hls.storage]\nkind = \"ftp\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("ftp"), "{e}");
        let e = Config::parse("[hls.storage]\nbuckett = \"x\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("buckett"), "{e}");
        let s3_live = "kind = \"s3\"\nbucket = \"live\"\n";
        for (bad, key) in [
            ("kind = \"s3\"".to_owned(), "hls.storage.bucket"),
            (
                "kind = \"s3\"\nbucket = \"No/Slash\"".to_owned(),
                "hls.storage.bucket",
            ),
            ("bucket = \"live\"".to_owned(), "hls.storage.bucket"),
            (
                "kind = \"memory\"\nprefix = \"x\"".to_owned(),
                "hls.storage.prefix",
            ),
            (
                format!("{s3_live}endpoint = \"http://h:9000\""),
                "hls.storage.endpoint",
            ),
            (
                format!("{s3_live}endpoint = \"ftp://h\""),
                "hls.storage.endpoint",
            ),
            (
                format!("{s3_live}endpoint = \"not a url\""),
                "hls.storage.endpoint",
            ),
            (
                format!("{s3_live}access_key_id = \"id\""),
                "hls.storage.access_key_id",
            ),
            (format!("{s3_live}prefix = \"a//b\""), "hls.storage.prefix"),
            (
                format!("{s3_live}prefix = \"a/../b\""),
                "hls.storage.prefix",
            ),
            (format!("{s3_live}region = \"\""), "hls.storage.region"),
            ("retries = 11".to_owned(), "hls.storage.retries"),
        ] {
            let c = Config::parse(&format!("[hls.storage]\n{bad}\n"), "t").unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(key), "{bad}: {e}");
        }
        // Storage is global: a stream cannot have its own.
        let e = Config::parse("[streams.a.hls.storage]\nkind = \"memory\"\n", "t");
        assert!(e.is_err());
    }

    #[test]
    fn hls_format_global_and_per_stream() {
        let c = Config::load(None, &Overrides::default()).unwrap();
        assert_eq!(c.hls.format, HlsFormat::Mpegts);
        assert_eq!(c.hls.part_target(), Duration::from_millis(200));
        let c = Config::parse(
            "[hls]\nformat = \"fmp4\"\n[streams.ll]\nhls.format = \"llhls\"\n\
             [streams.ts.hls]\nformat = \"mpegts\"\n",
            "t",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.hls_for("other").format, HlsFormat::Fmp4);
        assert_eq!(c.hls_for("ll").format, HlsFormat::Llhls);
        assert_eq!(c.hls_for("ts").format, HlsFormat::Mpegts);
        assert!(c.hls_for("ll").format.is_fmp4() && c.hls_for("ll").format.is_low_latency());
        let c = Config::parse("[stream_defaults.hls]\nformat = \"llhls\"\n", "t").unwrap();
        assert_eq!(c.hls_for("any").format, HlsFormat::Llhls);

        let e = Config::parse("[hls]\nformat = \"dash\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("dash"), "{e}");
        let e = Config::parse("[streams.a.hls]\nformt = \"fmp4\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("formt"), "{e}");
        for bad in ["part_duration = 0.05", "part_duration = 1.5"] {
            let c = Config::parse(&format!("[hls]\n{bad}\n"), "t").unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("hls.part_duration"), "{bad}: {e}");
        }
        let c = Config::parse("[hls]\nsegment_duration = 1.0\npart_duration = 0.5\n", "t");
        c.unwrap().validate().unwrap();
    }

    #[test]
    fn stream_names() {
        assert!(valid_stream_name("cam-1.main_2"));
        assert!(!valid_stream_name("../etc"));
        assert!(!valid_stream_name(""));
        assert!(!valid_stream_name("a/b"));
    }
}
