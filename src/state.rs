//! Streams defined through the API (`PUT /api/v1/streams/NAME`), kept in a
//! JSON file (`server.state_file`, default `DATA_DIR/streams.json`) so they
//! survive restarts. They are layered over the config file's `[streams]`:
//! a stream defined here replaces the file's settings for that name.
//!
//! Every change is written before it is acknowledged: the whole file goes
//! to a temporary file in the same directory, which is fsynced, renamed over
//! the old one, and the directory fsynced. A crash at any point leaves the
//! old file or the new one, never a mix; a change answered with a 2xx is on
//! disk. The file holds the streams' tokens and push URLs (secrets): it is
//! created readable by its owner only.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{Config, ConfigError, StreamConfig, valid_stream_name};
use crate::streams::lock;

/// Version of the file's layout.
const VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state file {path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("writing the state file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Why stream settings given to the API were refused.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// Not the shape of stream settings: unknown field, wrong type.
    #[error("{0}")]
    Syntax(String),
    /// Well formed, but a value is not acceptable (unknown preset, short
    /// token, bad push URL).
    #[error("{0}")]
    Invalid(String),
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    /// Stream name → the settings as they were given (JSON), validated.
    streams: BTreeMap<String, Value>,
}

/// One API-defined stream: its settings, and the JSON they came from (what
/// the file keeps).
#[derive(Clone)]
struct Entry {
    settings: StreamConfig,
    json: Value,
}

pub struct StreamStore {
    /// `None`: kept in memory only.
    path: Option<PathBuf>,
    streams: Mutex<BTreeMap<String, Entry>>,
    /// Held while the file is written, so writes happen one at a time and
    /// in the order the memory changes.
    writer: Mutex<()>,
}

/// Parses and validates stream settings given as JSON: the keys of
/// `[streams.NAME]` (`enabled`, `preset`, `tokens`, `push`, `takeover`,
/// `hls`), every one optional, unknown ones refused.
pub fn parse_settings(config: &Config, json: &Value) -> Result<StreamConfig, SettingsError> {
    if !json.is_object() {
        return Err(SettingsError::Syntax(
            "the stream settings must be a JSON object".into(),
        ));
    }
    let settings: StreamConfig = serde_path_to_error::deserialize(json).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            SettingsError::Syntax(inner.to_string())
        } else {
            SettingsError::Syntax(format!("`{path}`: {inner}"))
        }
    })?;
    config.validate_stream("", &settings).map_err(|e| match e {
        ConfigError::Invalid { key, message } => {
            SettingsError::Invalid(format!("invalid value for `{key}`: {message}"))
        }
        e => SettingsError::Invalid(e.to_string()),
    })?;
    // A GET shows secrets masked; sending them back as they are shown
    // would replace the real ones with the mask.
    if let Some(i) = settings
        .tokens
        .iter()
        .position(|t| t.chars().all(|c| c == '*'))
    {
        return Err(SettingsError::Invalid(format!(
            "invalid value for `tokens[{i}]`: this is the masked form shown by GET; send the token itself"
        )));
    }
    if let Some(i) = settings.push.iter().position(|u| {
        crate::rtmp::target::Target::parse(&u.replace("{stream}", "x"))
            .is_ok_and(|t| t.key.starts_with("****"))
    }) {
        return Err(SettingsError::Invalid(format!(
            "invalid value for `push[{i}]`: the stream key is the masked form shown by GET; send the URL itself"
        )));
    }
    Ok(settings)
}

impl StreamStore {
    /// A store that is not written anywhere.
    pub fn in_memory() -> Self {
        Self {
            path: None,
            streams: Mutex::new(BTreeMap::new()),
            writer: Mutex::new(()),
        }
    }

    /// Loads `config.state_file()` (an absent file is an empty store). A
    /// file that does not parse, or a stream in it that is not valid under
    /// this config (a preset gone), is an error: the server does not start
    /// without the streams it acknowledged.
    pub fn open(config: &Config) -> Result<Self, StateError> {
        let path = config.state_file();
        let load_error = |message: String| StateError::Load {
            path: path.clone(),
            message,
        };
        let mut streams = BTreeMap::new();
        match std::fs::read(&path) {
            Ok(bytes) => {
                let file: StateFile = serde_json::from_slice(&bytes)
                    .map_err(|e| load_error(format!("not a whipgate state file: {e}")))?;
                if file.version != VERSION {
                    return Err(load_error(format!(
                        "version {} (this whipgate reads version {VERSION})",
                        file.version
                    )));
                }
                for (name, json) in file.streams {
                    if !valid_stream_name(&name) {
                        return Err(load_error(format!("`{name}` is not a valid stream name")));
                    }
                    let settings = parse_settings(config, &json)
                        .map_err(|e| load_error(format!("stream `{name}`: {e}")))?;
                    streams.insert(name, Entry { settings, json });
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(load_error(e.to_string())),
        }
        if !streams.is_empty() {
            tracing::info!(file = %path.display(), streams = streams.len(), "streams defined through the API loaded");
        }
        Ok(Self {
            path: Some(path),
            streams: Mutex::new(streams),
            writer: Mutex::new(()),
        })
    }

    /// Where the store is written, if anywhere.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub fn get(&self, name: &str) -> Option<StreamConfig> {
        lock(&self.streams).get(name).map(|e| e.settings.clone())
    }

    pub fn contains(&self, name: &str) -> bool {
        lock(&self.streams).contains_key(name)
    }

    /// The names of the streams defined here, sorted.
    pub fn names(&self) -> Vec<String> {
        lock(&self.streams).keys().cloned().collect()
    }

    /// Creates or replaces `name` (settings validated by the caller with
    /// [`parse_settings`]); written to disk before it returns. True when
    /// the stream was not defined here before. Blocking.
    pub fn put(&self, name: &str, settings: StreamConfig, json: Value) -> Result<bool, StateError> {
        self.change(|streams| {
            streams
                .insert(name.to_owned(), Entry { settings, json })
                .is_none()
        })
    }

    /// Forgets `name`; written to disk before it returns. False when it was
    /// not defined here. Blocking.
    pub fn remove(&self, name: &str) -> Result<bool, StateError> {
        if !self.contains(name) {
            return Ok(false);
        }
        self.change(|streams| streams.remove(name).is_some())
    }

    /// Applies `f` to a copy, writes the copy, and only then makes it the
    /// current state: readers never see a change that is not on disk.
    fn change<T>(
        &self,
        f: impl FnOnce(&mut BTreeMap<String, Entry>) -> T,
    ) -> Result<T, StateError> {
        let _writing = lock(&self.writer);
        let mut next = lock(&self.streams).clone();
        let result = f(&mut next);
        if let Some(path) = &self.path {
            let file = StateFile {
                version: VERSION,
                streams: next
                    .iter()
                    .map(|(n, e)| (n.clone(), e.json.clone()))
                    .collect(),
            };
            let mut bytes = serde_json::to_vec_pretty(&file).expect("JSON values serialize");
            bytes.push(b'\n');
            write_atomic(path, &bytes).map_err(|source| StateError::Write {
                path: path.clone(),
                source,
            })?;
        }
        *lock(&self.streams) = next;
        Ok(result)
    }
}

/// Replaces `path` with `bytes` so that a crash leaves either the old or
/// the new content: temporary file in the same directory, fsync, rename,
/// fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "state".into());
    let tmp = dir.join(format!(".{name}.{}.tmp", crate::rtc::random_id(6)));
    let written = (|| {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    // The rename is durable once the directory is.
    #[cfg(unix)]
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Overrides;
    use serde_json::json;

    fn config(dir: &Path) -> Config {
        let o = Overrides {
            data_dir: Some(dir.to_owned()),
            ..Default::default()
        };
        Config::load(None, &o).unwrap()
    }

    #[test]
    fn settings_are_checked_like_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(dir.path());
        let s = parse_settings(&c, &json!({"preset": "copy-all", "tokens": ["12345678"]})).unwrap();
        assert_eq!(s.preset, "copy-all");
        assert!(s.enabled, "defaults as in the config file");
        for (bad, needle) in [
            (json!({"nope": 1}), "nope"),
            (json!({"enabled": "yes"}), "enabled"),
            (json!({"push": "rtmp://h/a/k"}), "push"),
            (json!({"takeover": "sometimes"}), "takeover"),
            (json!([1]), "object"),
        ] {
            let e = parse_settings(&c, &bad).unwrap_err();
            assert!(matches!(e, SettingsError::Syntax(_)), "{bad}: {e}");
            assert!(e.to_string().contains(needle), "{bad}: {e}");
        }
        for (bad, needle) in [
            (json!({"preset": "nope"}), "`preset`"),
            (json!({"tokens": ["short"]}), "`tokens`"),
            (json!({"push": ["http://x/a/b"]}), "`push[0]`"),
            (json!({"tokens": ["********"]}), "`tokens[0]`"),
            (json!({"push": ["rtmp://h/app/****abcd"]}), "`push[0]`"),
        ] {
            let e = parse_settings(&c, &bad).unwrap_err();
            assert!(matches!(e, SettingsError::Invalid(_)), "{bad}: {e}");
            assert!(e.to_string().contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn changes_survive_a_reopen_and_bad_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(dir.path());
        let store = StreamStore::open(&c).unwrap();
        assert!(store.names().is_empty());
        let json = json!({"push": ["rtmp://127.0.0.1/live/secret-key"], "takeover": "never"});
        let s = parse_settings(&c, &json).unwrap();
        assert!(store.put("cam", s.clone(), json.clone()).unwrap());
        assert!(!store.put("cam", s, json).unwrap(), "replaced");
        let other = json!({});
        store
            .put("b", parse_settings(&c, &other).unwrap(), other)
            .unwrap();
        assert!(store.remove("b").unwrap());
        assert!(!store.remove("b").unwrap());

        let again = StreamStore::open(&c).unwrap();
        assert_eq!(again.names(), vec!["cam"]);
        let cam = again.get("cam").unwrap();
        assert_eq!(cam.push, vec!["rtmp://127.0.0.1/live/secret-key"]);
        assert_eq!(cam.takeover, crate::config::Takeover::Never);
        // No temporary file left behind; owner-only permissions.
        let files: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(files, vec!["streams.json"]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(c.state_file())
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "{mode:o}");
        }

        for bad in [
            "{",
            r#"{"version": 2, "streams": {}}"#,
            r#"{"version": 1, "streams": {"a": {"preset": "gone"}}}"#,
            r#"{"version": 1, "streams": {"../x": {}}}"#,
        ] {
            std::fs::write(c.state_file(), bad).unwrap();
            let e = StreamStore::open(&c).err().expect(bad).to_string();
            assert!(e.contains("streams.json"), "{bad}: {e}");
        }
    }
}
