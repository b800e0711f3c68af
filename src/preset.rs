//! Presets as data: what a stream's outputs are made of (video copied,
//! transcoded into a ladder of renditions, or dropped; audio as AAC, copied
//! or dropped), one TOML file per preset.
//!
//! The shipped presets (`presets/*.toml` of the source tree) are compiled
//! into the binary; the files of a directory (`server.presets_dir`) add to
//! them or replace them by name. Every file is validated when it is loaded,
//! at start-up: an error names the file and the key
//! ("presets/abr-720p.toml: invalid value for `video.renditions[1].height`:
//! must be even"), a TOML syntax error the file and the line.
//!
//! Today the server applies the audio part (AAC transcoding, or none for
//! `copy` and `drop`) and the video `copy` and `drop` modes (HLS and RTMP); the
//! renditions of `mode = "transcode"` are validated here and applied by the
//! video transcoder when it lands.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use crate::transcode::audio::{AacCoder, AacSettings};

/// The presets compiled into the binary: (name, TOML text).
const SHIPPED: &[(&str, &str)] = &[
    ("passthrough", include_str!("../presets/passthrough.toml")),
    ("copy-all", include_str!("../presets/copy-all.toml")),
    ("abr-720p", include_str!("../presets/abr-720p.toml")),
    ("abr-1080p", include_str!("../presets/abr-1080p.toml")),
    ("audio-only", include_str!("../presets/audio-only.toml")),
    ("screen", include_str!("../presets/screen.toml")),
    ("simulcast", include_str!("../presets/simulcast.toml")),
];

/// The preset of a stream that names none.
pub const DEFAULT_PRESET: &str = "passthrough";

/// Most renditions in one ladder.
pub const MAX_RENDITIONS: usize = 8;
pub const MAX_WIDTH: u32 = 7680;
pub const MAX_HEIGHT: u32 = 4320;
const MIN_SIDE: u32 = 16;
/// Video bitrates (bits/s) a rendition may ask for.
const VIDEO_BITRATES: std::ops::RangeInclusive<u32> = 50_000..=100_000_000;
/// AAC bitrates (bits/s).
const AAC_BITRATES: std::ops::RangeInclusive<u32> = 16_000..=320_000;
/// AAC sample rates (the encoder resamples the 48 kHz Opus to them).
const AAC_SAMPLE_RATES: &[u32] = &[
    8_000, 11_025, 12_000, 16_000, 22_050, 24_000, 32_000, 44_100, 48_000,
];
/// H264 levels (`level = "4.1"` or `level = 4.1`).
const H264_LEVELS: &[&str] = &[
    "1", "1b", "1.1", "1.2", "1.3", "2", "2.1", "2.2", "3", "3.1", "3.2", "4", "4.1", "4.2", "5",
    "5.1", "5.2", "6", "6.1", "6.2",
];
/// x264 `--tune` values that change psychovisual settings: at most one.
const X264_PSY_TUNES: &[&str] = &["film", "animation", "grain", "stillimage", "psnr", "ssim"];
/// x264 `--tune` values that combine with one of the above.
const X264_EXTRA_TUNES: &[&str] = &["fastdecode", "zerolatency"];

#[derive(Debug, thiserror::Error)]
pub enum PresetError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// TOML syntax, an unknown key, a value of the wrong type.
    #[error("{file}, line {line}, column {column}: {}{message}", key.as_ref().map(|k| format!("`{k}`: ")).unwrap_or_default())]
    Parse {
        file: String,
        line: usize,
        column: usize,
        key: Option<String>,
        message: String,
    },
    /// A value out of range or not allowed with the others.
    #[error("{file}: invalid value for `{key}`: {message}")]
    Invalid {
        file: String,
        key: String,
        message: String,
    },
}

impl PresetError {
    /// The file the error is about.
    pub fn file(&self) -> String {
        match self {
            PresetError::Read { path, .. } => path.display().to_string(),
            PresetError::Parse { file, .. } | PresetError::Invalid { file, .. } => file.clone(),
        }
    }

    /// The key the error is about, when there is one.
    pub fn key(&self) -> Option<&str> {
        match self {
            PresetError::Read { .. } => None,
            PresetError::Parse { key, .. } => key.as_deref(),
            PresetError::Invalid { key, .. } => Some(key),
        }
    }
}

/// One preset, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Preset {
    /// The file name without `.toml`: what `streams.NAME.preset` names.
    pub name: String,
    pub description: String,
    pub video: Video,
    pub audio: Audio,
    /// Where it came from (a path, or `presets/NAME.toml (built in)`).
    pub origin: String,
}

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PresetFile {
    name: Option<String>,
    description: Option<String>,
    #[serde(default)]
    video: Video,
    #[serde(default)]
    audio: Audio,
}

/// `[video]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Video {
    #[serde(default)]
    pub mode: VideoMode,
    /// Video the outputs cannot take as published (VP8, VP9, AV1 from
    /// browsers): `encode` it to H264 (the default), or `refuse` such offers
    /// (422).
    #[serde(default)]
    pub non_h264: NonH264,
    /// `[[video.renditions]]`, with `mode = "transcode"` only.
    #[serde(default)]
    pub renditions: Vec<Rendition>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NonH264 {
    #[default]
    Encode,
    Refuse,
}

impl Video {
    /// The preset takes VP8, VP9 and AV1 publishers (encoded to H264, or
    /// dropped).
    pub fn accepts_non_h264(&self) -> bool {
        self.mode == VideoMode::Drop || self.non_h264 == NonH264::Encode
    }

    /// VP8, VP9 or AV1 arriving on the stream is encoded to H264.
    pub fn encodes_non_h264(&self) -> bool {
        self.mode != VideoMode::Drop && self.non_h264 == NonH264::Encode
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VideoMode {
    /// The published H264, as it is.
    #[default]
    Copy,
    /// The renditions of `video.renditions`.
    Transcode,
    /// No video in the outputs.
    Drop,
}

/// One rung of a ladder: the published video copied (`source = true`) or an
/// encoding of it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rendition {
    /// Names the rendition in playlists and paths: letters, digits, `-`, `_`.
    pub name: String,
    /// The published video, copied, as one rendition of the ladder.
    #[serde(default)]
    pub source: bool,
    /// The simulcast layer with this RID (RFC 8851), copied, as one
    /// rendition of the ladder: no encoding cost.
    pub simulcast: Option<String>,
    /// Output codec (only `h264` for now).
    pub codec: Option<VideoCodec>,
    /// `libx264` (default), `h264_nvenc`, `h264_vaapi`, or `auto`.
    pub encoder: Option<Encoder>,
    /// Output size; `height` alone keeps the aspect ratio, neither keeps the
    /// published size.
    pub width: Option<u32>,
    pub height: Option<u32>,
    /// Average bits/s.
    pub bitrate: Option<u32>,
    /// Peak bits/s (default: `bitrate`).
    pub maxrate: Option<u32>,
    /// Rate control buffer, bits (default: twice `maxrate`).
    pub bufsize: Option<u32>,
    /// Frame rate cap: faster sources have frames dropped.
    pub max_fps: Option<f64>,
    /// Keyframe interval: seconds, or `"segment"` (default): a keyframe at
    /// each HLS segment boundary, aligned across renditions.
    pub gop: Option<Gop>,
    /// `ultrafast` … `placebo` (default `veryfast`); libx264 only.
    pub x264_preset: Option<X264Preset>,
    /// `--tune`, e.g. `"zerolatency"` or `"stillimage,zerolatency"`;
    /// libx264 only.
    pub x264_tune: Option<String>,
    /// `baseline`, `main` or `high` (default `high`).
    pub profile: Option<H264Profile>,
    /// H264 level, e.g. `"4.1"`; default: the encoder's choice.
    pub level: Option<H264Level>,
}

impl Rendition {
    /// Peak bitrate, bits/s.
    pub fn maxrate(&self) -> Option<u32> {
        self.maxrate.or(self.bitrate)
    }

    /// Rate control buffer, bits.
    pub fn bufsize(&self) -> Option<u32> {
        self.bufsize
            .or_else(|| self.maxrate().map(|m| m.saturating_mul(2)))
    }

    pub fn encoder(&self) -> Encoder {
        self.encoder.unwrap_or_default()
    }

    pub fn gop(&self) -> Gop {
        self.gop.unwrap_or_default()
    }

    pub fn profile(&self) -> H264Profile {
        self.profile.unwrap_or_default()
    }

    pub fn x264_preset(&self) -> X264Preset {
        self.x264_preset.unwrap_or_default()
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VideoCodec {
    #[default]
    H264,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoder {
    #[default]
    Libx264,
    /// NVIDIA NVENC (asked for: it must be present).
    H264Nvenc,
    /// VA-API (Intel, AMD): refused for now, frame upload is not written.
    H264Vaapi,
    /// A hardware encoder when one works, libx264 otherwise.
    Auto,
}

impl Encoder {
    /// The FFmpeg encoder name (`auto`: decided when the encoder opens).
    pub fn as_str(self) -> &'static str {
        match self {
            Encoder::Libx264 => "libx264",
            Encoder::H264Nvenc => "h264_nvenc",
            Encoder::H264Vaapi => "h264_vaapi",
            Encoder::Auto => "auto",
        }
    }

    /// Whether x264 settings apply (libx264 itself, or its fallback).
    pub fn may_be_x264(self) -> bool {
        matches!(self, Encoder::Libx264 | Encoder::Auto)
    }
}

/// x264's speed/quality presets, fastest first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum X264Preset {
    Ultrafast,
    Superfast,
    #[default]
    Veryfast,
    Faster,
    Fast,
    Medium,
    Slow,
    Slower,
    Veryslow,
    Placebo,
}

impl X264Preset {
    pub fn as_str(self) -> &'static str {
        match self {
            X264Preset::Ultrafast => "ultrafast",
            X264Preset::Superfast => "superfast",
            X264Preset::Veryfast => "veryfast",
            X264Preset::Faster => "faster",
            X264Preset::Fast => "fast",
            X264Preset::Medium => "medium",
            X264Preset::Slow => "slow",
            X264Preset::Slower => "slower",
            X264Preset::Veryslow => "veryslow",
            X264Preset::Placebo => "placebo",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum H264Profile {
    Baseline,
    Main,
    #[default]
    High,
}

impl H264Profile {
    pub fn as_str(self) -> &'static str {
        match self {
            H264Profile::Baseline => "baseline",
            H264Profile::Main => "main",
            H264Profile::High => "high",
        }
    }
}

/// An H264 level as written (`"4.1"`, `4.1`, `4`); checked by validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct H264Level(pub String);

impl<'de> Deserialize<'de> for H264Level {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = H264Level;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an H264 level such as \"4.1\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<H264Level, E> {
                Ok(H264Level(v.trim().to_owned()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<H264Level, E> {
                Ok(H264Level(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<H264Level, E> {
                Ok(H264Level(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<H264Level, E> {
                // 4.1 -> "4.1", 4.0 -> "4".
                Ok(H264Level(format!("{v}")))
            }
        }
        d.deserialize_any(V)
    }
}

/// Keyframe interval of an encoded rendition.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub enum Gop {
    /// A keyframe at every HLS segment boundary (`hls.segment_duration`),
    /// the same instants in every rendition, so players switch cleanly.
    #[default]
    Segment,
    /// A keyframe every so many seconds.
    Seconds(f64),
}

impl<'de> Deserialize<'de> for Gop {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Gop;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("seconds or \"segment\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Gop, E> {
                if v == "segment" {
                    Ok(Gop::Segment)
                } else {
                    Err(E::invalid_value(de::Unexpected::Str(v), &self))
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Gop, E> {
                Ok(Gop::Seconds(v as f64))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Gop, E> {
                Ok(Gop::Seconds(v as f64))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Gop, E> {
                Ok(Gop::Seconds(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// `[audio]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Audio {
    #[serde(default)]
    pub mode: AudioMode,
    /// AAC bits/s (default 128 000).
    pub bitrate: Option<u32>,
    /// AAC sample rate (default 48 000).
    pub sample_rate: Option<u32>,
    /// 1 or 2 (default 2).
    pub channels: Option<u8>,
    /// AAC encoder: `syom` (default, pure Rust, the cheapest), or FFmpeg's
    /// native encoder with its `fast` or `twoloop` coder.
    pub coder: Option<AacCoderName>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AudioMode {
    /// The published Opus transcoded to AAC-LC (MPEG-TS HLS, RTMP).
    #[default]
    Aac,
    /// The published Opus as it is, for outputs that take Opus; MPEG-TS
    /// HLS and classic RTMP do not, so they get no audio.
    Copy,
    /// No audio in the outputs.
    Drop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AacCoderName {
    Syom,
    Fast,
    Twoloop,
}

impl Audio {
    /// The AAC transcoder's settings, when the audio is transcoded to AAC.
    pub fn aac_settings(&self) -> Option<AacSettings> {
        if self.mode != AudioMode::Aac {
            return None;
        }
        let d = AacSettings::default();
        Some(AacSettings {
            bitrate: self.bitrate.unwrap_or(d.bitrate),
            sample_rate: self.sample_rate.unwrap_or(d.sample_rate),
            channels: self.channels.unwrap_or(d.channels),
            coder: match self.coder {
                None => d.coder,
                Some(AacCoderName::Syom) => AacCoder::Syom,
                Some(AacCoderName::Fast) => AacCoder::Fast,
                Some(AacCoderName::Twoloop) => AacCoder::TwoLoop,
            },
        })
    }
}

impl Preset {
    /// Parses and validates one preset file. `file` names it in errors; its
    /// stem (`abr-720p` of `presets/abr-720p.toml`) is the preset's name.
    pub fn parse(text: &str, file: &str) -> Result<Preset, PresetError> {
        let stem = Path::new(file)
            .file_name()
            .and_then(|n| n.to_str())
            .map(|n| n.strip_suffix(".toml").unwrap_or(n))
            .unwrap_or_default()
            .to_owned();
        let parsed: PresetFile = deserialize(text, file)?;
        let invalid = |key: &str, message: String| PresetError::Invalid {
            file: file.to_owned(),
            key: key.to_owned(),
            message,
        };
        if !valid_name(&stem) {
            return Err(invalid(
                "name",
                format!(
                    "`{stem}`: preset names (the file name without .toml) use letters, digits, '-' and '_' (1 to 64)"
                ),
            ));
        }
        if let Some(name) = &parsed.name
            && *name != stem
        {
            return Err(invalid(
                "name",
                format!("`{name}` differs from the file name `{stem}.toml`"),
            ));
        }
        let preset = Preset {
            name: stem,
            description: parsed.description.unwrap_or_default(),
            video: parsed.video,
            audio: parsed.audio,
            origin: file.to_owned(),
        };
        preset
            .validate()
            .map_err(|(key, message)| invalid(&key, message))?;
        Ok(preset)
    }

    /// Whether the video is copied as published somewhere in the outputs.
    pub fn copies_video(&self) -> bool {
        match self.video.mode {
            VideoMode::Copy => true,
            VideoMode::Transcode => self
                .video
                .renditions
                .iter()
                .any(|r| r.source || r.simulcast.is_some()),
            VideoMode::Drop => false,
        }
    }

    /// Checks values: `Err((key, message))`.
    fn validate(&self) -> Result<(), (String, String)> {
        let v = &self.video;
        match v.mode {
            VideoMode::Copy | VideoMode::Drop => {
                if !v.renditions.is_empty() {
                    return Err(err(
                        "video.renditions",
                        "only with video.mode = \"transcode\"",
                    ));
                }
            }
            VideoMode::Transcode => {
                if v.renditions.is_empty() {
                    return Err(err(
                        "video.renditions",
                        "mode = \"transcode\" needs at least one [[video.renditions]]",
                    ));
                }
                if v.renditions.len() > MAX_RENDITIONS {
                    return Err(err(
                        "video.renditions",
                        format!("at most {MAX_RENDITIONS} renditions"),
                    ));
                }
                let mut names = HashSet::new();
                let mut source = None;
                for (i, r) in v.renditions.iter().enumerate() {
                    let key = format!("video.renditions[{i}]");
                    if !valid_rendition_name(&r.name) {
                        return Err(err(
                            format!("{key}.name"),
                            format!(
                                "`{}`: rendition names use letters, digits, '-' and '_' (1 to 32)",
                                r.name
                            ),
                        ));
                    }
                    if !names.insert(r.name.as_str()) {
                        return Err(err(
                            format!("{key}.name"),
                            format!("`{}` is already the name of another rendition", r.name),
                        ));
                    }
                    if let Some(rid) = &r.simulcast {
                        if r.source {
                            return Err(err(
                                format!("{key}.simulcast"),
                                "a rendition is the source or a simulcast layer, not both",
                            ));
                        }
                        if !valid_rid(rid) {
                            return Err(err(
                                format!("{key}.simulcast"),
                                format!(
                                    "`{rid}`: a simulcast RID uses letters, digits, '-' and '_' (1 to 16)"
                                ),
                            ));
                        }
                        let earlier = v.renditions[..i]
                            .iter()
                            .position(|o| o.simulcast.as_deref() == Some(rid));
                        if let Some(j) = earlier {
                            return Err(err(
                                format!("{key}.simulcast"),
                                format!("layer `{rid}` is already video.renditions[{j}]"),
                            ));
                        }
                        validate_copied(r, &key, "simulcast (a published layer, copied)")?;
                    } else if r.source {
                        if let Some(first) = source {
                            return Err(err(
                                format!("{key}.source"),
                                format!(
                                    "only one source rendition per ladder (video.renditions[{first}] is one)"
                                ),
                            ));
                        }
                        source = Some(i);
                        validate_copied(r, &key, "source = true (the published video, copied)")?;
                    } else {
                        validate_encoded(r, &key)?;
                    }
                }
                if v.renditions
                    .iter()
                    .all(|r| r.source && r.simulcast.is_none())
                {
                    return Err(err(
                        "video.renditions",
                        "a ladder with only the source rendition is video.mode = \"copy\"",
                    ));
                }
            }
        }

        let a = &self.audio;
        if a.mode == AudioMode::Aac {
            if let Some(b) = a.bitrate
                && !AAC_BITRATES.contains(&b)
            {
                return Err(err(
                    "audio.bitrate",
                    "must be between 16000 and 320000 bits/s",
                ));
            }
            if let Some(r) = a.sample_rate
                && !AAC_SAMPLE_RATES.contains(&r)
            {
                return Err(err(
                    "audio.sample_rate",
                    format!("must be one of {AAC_SAMPLE_RATES:?} Hz"),
                ));
            }
            if let Some(c) = a.channels
                && !(1..=2).contains(&c)
            {
                return Err(err("audio.channels", "must be 1 or 2"));
            }
        } else {
            let set = [
                ("bitrate", a.bitrate.is_some()),
                ("sample_rate", a.sample_rate.is_some()),
                ("channels", a.channels.is_some()),
                ("coder", a.coder.is_some()),
            ];
            if let Some((k, _)) = set.iter().find(|(_, set)| *set) {
                return Err(err(format!("audio.{k}"), "only with audio.mode = \"aac\""));
            }
        }
        if v.mode == VideoMode::Drop && a.mode == AudioMode::Drop {
            return Err(err(
                "video.mode",
                "video and audio both dropped: the outputs would be empty",
            ));
        }
        Ok(())
    }
}

fn err(key: impl Into<String>, message: impl Into<String>) -> (String, String) {
    (key.into(), message.into())
}

/// A simulcast RID as presets name it.
fn valid_rid(rid: &str) -> bool {
    name_of(rid, 16)
}

/// The source rendition and simulcast layers are published video: they take
/// no encoding keys.
fn validate_copied(r: &Rendition, key: &str, what: &str) -> Result<(), (String, String)> {
    let set = [
        ("codec", r.codec.is_some()),
        ("encoder", r.encoder.is_some()),
        ("width", r.width.is_some()),
        ("height", r.height.is_some()),
        ("bitrate", r.bitrate.is_some()),
        ("maxrate", r.maxrate.is_some()),
        ("bufsize", r.bufsize.is_some()),
        ("max_fps", r.max_fps.is_some()),
        ("gop", r.gop.is_some()),
        ("x264_preset", r.x264_preset.is_some()),
        ("x264_tune", r.x264_tune.is_some()),
        ("profile", r.profile.is_some()),
        ("level", r.level.is_some()),
    ];
    match set.iter().find(|(_, set)| *set) {
        Some((k, _)) => Err(err(
            format!("{key}.{k}"),
            format!("not allowed with {what}"),
        )),
        None => Ok(()),
    }
}

fn validate_encoded(r: &Rendition, key: &str) -> Result<(), (String, String)> {
    let k = |name: &str| format!("{key}.{name}");
    if r.encoder == Some(Encoder::H264Vaapi) {
        return Err(err(
            k("encoder"),
            "h264_vaapi is not supported yet (it needs VA-API frame upload): use h264_nvenc, auto or libx264",
        ));
    }
    match (r.width, r.height) {
        (Some(_), None) => {
            return Err(err(
                k("width"),
                "needs height too (height alone keeps the aspect ratio)",
            ));
        }
        (w, Some(h)) => {
            if let Some(w) = w {
                check_side(&k("width"), w, MAX_WIDTH)?;
            }
            check_side(&k("height"), h, MAX_HEIGHT)?;
        }
        (None, None) => {}
    }
    let Some(bitrate) = r.bitrate else {
        return Err(err(k("bitrate"), "is required (bits/s)"));
    };
    if !VIDEO_BITRATES.contains(&bitrate) {
        return Err(err(
            k("bitrate"),
            "must be between 50000 and 100000000 bits/s",
        ));
    }
    if let Some(m) = r.maxrate {
        if m < bitrate {
            return Err(err(
                k("maxrate"),
                format!("must be at least the bitrate ({bitrate})"),
            ));
        }
        if m > 2 * *VIDEO_BITRATES.end() {
            return Err(err(k("maxrate"), "must be at most 200000000 bits/s"));
        }
    }
    if let (Some(b), Some(m)) = (r.bufsize, r.maxrate())
        && (u64::from(b) * 10 < u64::from(m) || u64::from(b) > u64::from(m) * 10)
    {
        return Err(err(
            k("bufsize"),
            format!("must be between a tenth of and ten times the maxrate ({m} bits/s)"),
        ));
    }
    if let Some(fps) = r.max_fps
        && !(fps.is_finite() && (1.0..=120.0).contains(&fps))
    {
        return Err(err(k("max_fps"), "must be between 1 and 120"));
    }
    if let Some(Gop::Seconds(s)) = r.gop
        && !(s.is_finite() && (0.25..=20.0).contains(&s))
    {
        return Err(err(
            k("gop"),
            "must be between 0.25 and 20 seconds, or \"segment\"",
        ));
    }
    if !r.encoder().may_be_x264() {
        let x264 = [
            ("x264_preset", r.x264_preset.is_some()),
            ("x264_tune", r.x264_tune.is_some()),
        ];
        if let Some((name, _)) = x264.iter().find(|(_, set)| *set) {
            return Err(err(
                k(name),
                format!(
                    "applies to libx264 only, not to encoder = \"{}\"",
                    r.encoder().as_str()
                ),
            ));
        }
    }
    if let Some(tune) = &r.x264_tune {
        check_tune(&k("x264_tune"), tune)?;
    }
    if let Some(H264Level(level)) = &r.level
        && !H264_LEVELS.contains(&level.as_str())
    {
        return Err(err(
            k("level"),
            format!("`{level}` is not an H264 level (1 to 6.2, e.g. \"4.1\")"),
        ));
    }
    Ok(())
}

fn check_side(key: &str, v: u32, max: u32) -> Result<(), (String, String)> {
    if !(MIN_SIDE..=max).contains(&v) {
        return Err(err(key, format!("must be between {MIN_SIDE} and {max}")));
    }
    if !v.is_multiple_of(2) {
        return Err(err(key, "must be even"));
    }
    Ok(())
}

fn check_tune(key: &str, tune: &str) -> Result<(), (String, String)> {
    let mut psy = None;
    for t in tune.split(',').map(str::trim) {
        if X264_PSY_TUNES.contains(&t) {
            if let Some(other) = psy {
                return Err(err(key, format!("`{other}` and `{t}` cannot be combined")));
            }
            psy = Some(t);
        } else if !X264_EXTRA_TUNES.contains(&t) {
            return Err(err(
                key,
                format!(
                    "`{t}` is not an x264 tune (one of {}, plus fastdecode and/or zerolatency, comma separated)",
                    X264_PSY_TUNES.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

/// Rendition names: letters, digits, `-` and `_`, 1 to 32 (a directory
/// of the stream's HLS).
pub fn valid_rendition_name(name: &str) -> bool {
    valid_name(name) && name.len() <= 32
}

/// Preset and rendition names: they appear in paths and playlists.
fn valid_name(name: &str) -> bool {
    name_of(name, 64)
}

/// 1 to `max` letters, digits, `-` and `_`.
fn name_of(name: &str, max: usize) -> bool {
    (1..=max).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
}

/// TOML to `T`, errors naming the file, line and key.
fn deserialize<T: de::DeserializeOwned>(text: &str, file: &str) -> Result<T, PresetError> {
    let parse_error = |e: toml::de::Error, key: Option<String>| {
        let (line, column) = e.span().map_or((0, 0), |s| line_column(text, s.start));
        let mut message = e.message().trim().to_owned();
        let mut key = key;
        // deny_unknown_fields names the table; name the key itself.
        if let Some((field, tail)) = message
            .strip_prefix("unknown field `")
            .and_then(|rest| rest.split_once('`'))
        {
            // The path may or may not already end with the unknown key.
            key = Some(match key {
                Some(path) if path == field || path.ends_with(&format!(".{field}")) => path,
                Some(parent) => format!("{parent}.{field}"),
                None => field.to_owned(),
            });
            message = format!("unknown key{tail}");
        }
        PresetError::Parse {
            file: file.to_owned(),
            line,
            column,
            key,
            message,
        }
    };
    let de = toml::Deserializer::parse(text).map_err(|e| parse_error(e, None))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let key = (path != ".").then_some(path);
        parse_error(e.into_inner(), key)
    })
}

/// 1-based line and column of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Every preset the server knows, by name.
#[derive(Debug, Clone)]
pub struct Presets {
    by_name: BTreeMap<String, Arc<Preset>>,
}

static SHIPPED_PRESETS: LazyLock<Presets> = LazyLock::new(|| {
    let mut by_name = BTreeMap::new();
    for (name, text) in SHIPPED {
        let file = format!("presets/{name}.toml (built in)");
        // The shipped files are checked by the tests.
        let preset = Preset::parse(text, &format!("presets/{name}.toml"))
            .map(|p| Preset { origin: file, ..p })
            .unwrap_or_else(|e| panic!("shipped preset: {e}"));
        by_name.insert(preset.name.clone(), Arc::new(preset));
    }
    Presets { by_name }
});

impl Default for Presets {
    /// The shipped presets.
    fn default() -> Self {
        Self::shipped()
    }
}

impl Presets {
    /// The presets compiled into the binary.
    pub fn shipped() -> Self {
        SHIPPED_PRESETS.clone()
    }

    /// The shipped presets plus every `*.toml` of `dir`, which replace
    /// shipped ones of the same name. A missing directory adds nothing; a
    /// file that does not parse or validate is an error.
    pub fn load(dir: &Path) -> Result<Presets, PresetError> {
        let mut presets = Self::shipped();
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::debug!(dir = %dir.display(), "no presets directory; shipped presets only");
                return Ok(presets);
            }
            Err(source) => {
                return Err(PresetError::Read {
                    path: dir.to_owned(),
                    source,
                });
            }
        };
        let mut files = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| PresetError::Read {
                path: dir.to_owned(),
                source,
            })?;
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') || !name.ends_with(".toml") || path.is_dir() {
                continue;
            }
            files.push(path);
        }
        files.sort();
        for path in files {
            let text = std::fs::read_to_string(&path).map_err(|source| PresetError::Read {
                path: path.clone(),
                source,
            })?;
            let preset = Preset::parse(&text, &path.display().to_string())?;
            if let Some(old) = presets.by_name.get(&preset.name)
                && (old.video != preset.video || old.audio != preset.audio)
            {
                tracing::info!(preset = %preset.name, file = %path.display(), "preset replaces the shipped one");
            }
            presets
                .by_name
                .insert(preset.name.clone(), Arc::new(preset));
        }
        Ok(presets)
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Preset>> {
        self.by_name.get(name)
    }

    /// Preset names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_preset_loads() {
        let presets = Presets::shipped();
        let names: Vec<_> = presets.names().collect();
        assert_eq!(
            names,
            [
                "abr-1080p",
                "abr-720p",
                "audio-only",
                "copy-all",
                "passthrough",
                "screen",
                "simulcast"
            ]
        );
        // The repository's presets/ directory is the same set.
        let from_dir = Presets::load(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("presets")
                .as_path(),
        )
        .unwrap();
        assert_eq!(from_dir.len(), presets.len());
        for name in presets.names() {
            let (a, b) = (presets.get(name).unwrap(), from_dir.get(name).unwrap());
            assert_eq!(a.video, b.video, "{name}");
            assert_eq!(a.audio, b.audio, "{name}");
            assert!(!a.description.is_empty(), "{name} has a description");
        }
        let p = presets.get(DEFAULT_PRESET).unwrap();
        assert_eq!(p.video.mode, VideoMode::Copy);
        assert_eq!(p.audio.aac_settings(), Some(AacSettings::default()));
        let abr = presets.get("abr-720p").unwrap();
        assert_eq!(abr.video.mode, VideoMode::Transcode);
        let heights: Vec<_> = abr.video.renditions.iter().map(|r| r.height).collect();
        assert_eq!(heights, [None, Some(480), Some(360)]);
        assert!(abr.video.renditions[0].source && abr.copies_video());
        assert_eq!(abr.video.renditions[1].bitrate, Some(1_400_000));
        assert_eq!(abr.video.renditions[1].x264_preset(), X264Preset::Veryfast);
        assert_eq!(abr.video.renditions[1].gop(), Gop::Segment);
        let all = presets.get("abr-1080p").unwrap();
        assert_eq!(all.video.renditions.len(), 4);
        assert!(!all.copies_video());
        assert_eq!(presets.get("copy-all").unwrap().audio.aac_settings(), None);
        let audio = presets.get("audio-only").unwrap();
        assert_eq!(audio.video.mode, VideoMode::Drop);
        assert!(audio.audio.aac_settings().is_some());
        let screen = &presets.get("screen").unwrap().video.renditions[0];
        assert_eq!(screen.max_fps, Some(15.0));
        assert_eq!(screen.x264_tune.as_deref(), Some("stillimage,zerolatency"));
        assert_eq!(
            presets
                .get("screen")
                .unwrap()
                .audio
                .aac_settings()
                .unwrap()
                .bitrate,
            96_000
        );
    }

    const GOOD_LADDER: &str = r#"
name = "abr-720p"
[video]
mode = "transcode"
[[video.renditions]]
name = "source"
source = true
[[video.renditions]]
name = "480p"
width = 854
height = 480
bitrate = 1400000
"#;

    /// `GOOD_LADDER` with `extra` (TOML tables) appended.
    fn broken(extra: &str) -> PresetError {
        let text = format!("{GOOD_LADDER}{extra}\n");
        Preset::parse(&text, "presets/abr-720p.toml").unwrap_err()
    }

    #[test]
    fn good_ladder_parses() {
        let p = Preset::parse(GOOD_LADDER, "presets/abr-720p.toml").unwrap();
        assert_eq!(p.name, "abr-720p");
        let r = &p.video.renditions[1];
        assert_eq!((r.width, r.height), (Some(854), Some(480)));
        assert_eq!(r.maxrate(), Some(1_400_000));
        assert_eq!(r.bufsize(), Some(2_800_000));
        assert_eq!(r.encoder(), Encoder::Libx264);
        assert_eq!(r.profile(), H264Profile::High);
    }

    #[test]
    fn broken_presets_name_file_and_key() {
        let f = "presets/abr-720p.toml";
        let rung = |body: &str| format!("[[video.renditions]]\nname = \"x\"\n{body}");
        let invalid = [
            (
                rung("height = 481\nbitrate = 500000"),
                "video.renditions[2].height",
                "must be even",
            ),
            (
                rung("width = 640\nheight = 361\nbitrate = 500000"),
                "video.renditions[2].height",
                "must be even",
            ),
            (
                rung("width = 641\nheight = 360\nbitrate = 500000"),
                "video.renditions[2].width",
                "must be even",
            ),
            (
                rung("height = 8000\nbitrate = 500000"),
                "video.renditions[2].height",
                "between 16 and 4320",
            ),
            (
                rung("width = 7682\nheight = 360\nbitrate = 500000"),
                "video.renditions[2].width",
                "between 16 and 7680",
            ),
            (
                rung("width = 640\nbitrate = 500000"),
                "video.renditions[2].width",
                "needs height",
            ),
            (
                rung("height = 360"),
                "video.renditions[2].bitrate",
                "required",
            ),
            (
                rung("height = 360\nbitrate = 1000"),
                "video.renditions[2].bitrate",
                "between",
            ),
            (
                rung("bitrate = 900000\nmaxrate = 800000"),
                "video.renditions[2].maxrate",
                "at least the bitrate",
            ),
            (
                rung("bitrate = 900000\nbufsize = 50000"),
                "video.renditions[2].bufsize",
                "tenth",
            ),
            (
                rung("bitrate = 900000\nmax_fps = 0"),
                "video.renditions[2].max_fps",
                "between 1 and 120",
            ),
            (
                rung("bitrate = 900000\nmax_fps = 240"),
                "video.renditions[2].max_fps",
                "between 1 and 120",
            ),
            (
                rung("bitrate = 900000\ngop = 0"),
                "video.renditions[2].gop",
                "seconds",
            ),
            (
                rung("bitrate = 900000\nx264_tune = \"film,grain\""),
                "video.renditions[2].x264_tune",
                "cannot be combined",
            ),
            (
                rung("bitrate = 900000\nx264_tune = \"fast\""),
                "video.renditions[2].x264_tune",
                "not an x264 tune",
            ),
            (
                rung("bitrate = 900000\nencoder = \"h264_nvenc\"\nx264_preset = \"fast\""),
                "video.renditions[2].x264_preset",
                "libx264 only",
            ),
            (
                rung("bitrate = 900000\nencoder = \"h264_vaapi\""),
                "video.renditions[2].encoder",
                "not supported yet",
            ),
            (
                rung("bitrate = 900000\nlevel = 7"),
                "video.renditions[2].level",
                "not an H264 level",
            ),
            (
                "[[video.renditions]]\nname = \"480p\"\nbitrate = 900000".into(),
                "video.renditions[2].name",
                "already the name",
            ),
            (
                "[[video.renditions]]\nname = \"4 80\"\nbitrate = 900000".into(),
                "video.renditions[2].name",
                "letters, digits",
            ),
            (
                "[[video.renditions]]\nname = \"again\"\nsource = true".into(),
                "video.renditions[2].source",
                "only one source",
            ),
            (
                "[[video.renditions]]\nname = \"l\"\nsimulcast = \"l\"\nbitrate = 90000".into(),
                "video.renditions[2].bitrate",
                "not allowed with simulcast",
            ),
            (
                "[[video.renditions]]\nname = \"l\"\nsimulcast = \"l;m\"".into(),
                "video.renditions[2].simulcast",
                "letters, digits",
            ),
            (
                "[[video.renditions]]\nname = \"l\"\nsimulcast = \"l\"\nsource = true".into(),
                "video.renditions[2].simulcast",
                "not both",
            ),
            (
                "[[video.renditions]]\nname = \"l\"\nsimulcast = \"q\"\n\
                 [[video.renditions]]\nname = \"l2\"\nsimulcast = \"q\""
                    .into(),
                "video.renditions[3].simulcast",
                "already video.renditions[2]",
            ),
            (
                "[audio]\nmode = \"copy\"\nbitrate = 96000".into(),
                "audio.bitrate",
                "only with audio.mode",
            ),
            (
                "[audio]\nbitrate = 1000".into(),
                "audio.bitrate",
                "between 16000",
            ),
            (
                "[audio]\nsample_rate = 96000".into(),
                "audio.sample_rate",
                "must be one of",
            ),
            ("[audio]\nchannels = 6".into(), "audio.channels", "1 or 2"),
        ];
        for (extra, key, message) in invalid {
            let e = broken(&extra);
            let text = e.to_string();
            assert!(
                text.starts_with(&format!("{f}: invalid value for `{key}`: ")),
                "{extra}: {text}"
            );
            assert!(text.contains(message), "{extra}: {text}");
            assert_eq!(e.key(), Some(key));
        }
        assert_eq!(
            broken(&rung("height = 481\nbitrate = 500000")).to_string(),
            "presets/abr-720p.toml: invalid value for `video.renditions[2].height`: must be even"
        );
    }

    #[test]
    fn whole_file_rules() {
        let parse = |text: &str| {
            Preset::parse(text, "presets/p.toml")
                .unwrap_err()
                .to_string()
        };
        let e = parse("name = \"other\"\n");
        assert!(e.contains("`name`") && e.contains("differs"), "{e}");
        let e = parse("[video]\nmode = \"transcode\"\n");
        assert!(e.contains("`video.renditions`"), "{e}");
        let e = parse(
            "[video]\nmode = \"transcode\"\n[[video.renditions]]\nname = \"s\"\nsource = true\n",
        );
        assert!(
            e.contains("`video.renditions`") && e.contains("copy"),
            "{e}"
        );
        let e = parse("[video]\n[[video.renditions]]\nname = \"a\"\nbitrate = 500000\n");
        assert!(
            e.contains("`video.renditions`") && e.contains("transcode"),
            "{e}"
        );
        let e = parse(
            "[video]\nmode = \"transcode\"\n[[video.renditions]]\nname = \"s\"\nsource = true\nheight = 360\n",
        );
        assert!(
            e.contains("`video.renditions[0].height`") && e.contains("source = true"),
            "{e}"
        );
        let e = parse("[video]\nmode = \"drop\"\n[audio]\nmode = \"drop\"\n");
        assert!(e.contains("`video.mode`"), "{e}");
        let mut many = String::from("[video]\nmode = \"transcode\"\n");
        for i in 0..9 {
            many.push_str(&format!(
                "[[video.renditions]]\nname = \"r{i}\"\nbitrate = 500000\n"
            ));
        }
        assert!(parse(&many).contains("at most 8"));
        let e = Preset::parse("", "presets/bad name.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("presets/bad name.toml") && e.contains("`name`"),
            "{e}"
        );
        // Defaults: an empty file is passthrough.
        let p = Preset::parse("", "presets/empty.toml").unwrap();
        assert_eq!(
            (p.video.mode, p.audio.mode),
            (VideoMode::Copy, AudioMode::Aac)
        );
    }

    #[test]
    fn type_errors_and_unknown_keys_name_file_line_and_key() {
        let f = "presets/abr-720p.toml";
        let line_of =
            |needle: &str, text: &str| text.lines().position(|l| l.contains(needle)).unwrap() + 1;
        for (extra, key, message) in [
            (
                "[[video.renditions]]\nname = \"x\"\nheigth = 360",
                "video.renditions[2].heigth",
                "unknown key",
            ),
            (
                "[[video.renditions]]\nname = \"x\"\nheight = \"360\"",
                "video.renditions[2].height",
                "invalid type",
            ),
            (
                "[[video.renditions]]\nname = \"x\"\nx264_preset = \"fastest\"",
                "video.renditions[2].x264_preset",
                "unknown variant `fastest`",
            ),
            (
                "[[video.renditions]]\nname = \"x\"\nencoder = \"h265_nvenc\"",
                "video.renditions[2].encoder",
                "unknown variant",
            ),
            (
                "[[video.renditions]]\nname = \"x\"\nprofile = \"extended\"",
                "video.renditions[2].profile",
                "unknown variant",
            ),
            (
                "[[video.renditions]]\nname = \"x\"\ngop = \"keyframe\"",
                "video.renditions[2].gop",
                "\"segment\"",
            ),
            ("[audio]\nmode = \"mp3\"", "audio.mode", "unknown variant"),
            ("[audio]\nchannels = -1", "audio.channels", "invalid value"),
            ("[extras]\na = 1", "extras", "unknown key"),
        ] {
            let text = format!("{GOOD_LADDER}{extra}\n");
            let e = Preset::parse(&text, f).unwrap_err();
            let PresetError::Parse {
                line, key: Some(k), ..
            } = &e
            else {
                panic!("{extra}: {e:?}");
            };
            assert_eq!(k, key, "{e}");
            let needle = extra.lines().last().unwrap().split(' ').next().unwrap();
            let _ = line_of(needle, &text);
            assert!(*line > 0, "{e}");
            let shown = e.to_string();
            assert!(shown.starts_with(&format!("{f}, line ")), "{shown}");
            assert!(shown.contains(&format!("`{key}`")), "{shown}");
            assert!(shown.contains(message), "{shown}");
        }
        // The line is the one of the bad value.
        let text = format!("{GOOD_LADDER}[[video.renditions]]\nname = \"x\"\nheight = \"360\"\n");
        let e = Preset::parse(&text, f).unwrap_err();
        let PresetError::Parse { line, .. } = e else {
            panic!()
        };
        assert_eq!(line, line_of("height = \"360\"", &text));
    }

    #[test]
    fn syntax_error_names_file_and_line() {
        let text = "name = \"p\"\n[video]\nmode = \"copy\n[audio]\n";
        let e = Preset::parse(text, "presets/p.toml").unwrap_err();
        let PresetError::Parse { line, key, .. } = &e else {
            panic!("{e:?}");
        };
        assert_eq!(*line, 3, "{e}");
        assert!(key.is_none());
        assert!(
            e.to_string().starts_with("presets/p.toml, line 3, column "),
            "{e}"
        );
        let e = Preset::parse("[video\nmode = 1\n", "presets/p.toml").unwrap_err();
        assert!(e.to_string().starts_with("presets/p.toml, line 1, "), "{e}");
    }

    #[test]
    fn user_directory_adds_and_overrides() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("passthrough.toml"),
            "# mono, 64 kb/s\n[audio]\nbitrate = 64000\nchannels = 1\ncoder = \"twoloop\"\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("mine.toml"),
            "description = \"mine\"\n[audio]\nmode = \"drop\"\n",
        )
        .unwrap();
        // Not presets: ignored.
        std::fs::write(dir.path().join("README.md"), "notes").unwrap();
        std::fs::write(dir.path().join(".passthrough.toml.swp"), "junk").unwrap();
        std::fs::create_dir(dir.path().join("old.toml")).unwrap();
        let presets = Presets::load(dir.path()).unwrap();
        assert_eq!(presets.len(), Presets::shipped().len() + 1);
        let p = presets.get("passthrough").unwrap();
        assert_eq!(
            p.audio.aac_settings(),
            Some(AacSettings {
                bitrate: 64_000,
                sample_rate: 48_000,
                channels: 1,
                coder: AacCoder::TwoLoop,
            })
        );
        assert!(p.origin.ends_with("passthrough.toml"), "{}", p.origin);
        assert!(!p.origin.contains("built in"));
        assert_eq!(presets.get("mine").unwrap().audio.mode, AudioMode::Drop);
        assert!(presets.get("abr-720p").unwrap().origin.contains("built in"));

        // A missing directory adds nothing.
        let none = Presets::load(&dir.path().join("nope")).unwrap();
        assert_eq!(none.len(), Presets::shipped().len());

        // One broken file fails the whole load, naming it.
        let bad = dir.path().join("zz-broken.toml");
        std::fs::write(&bad, "[video]\nmode = \"transcode\"\n[[video.renditions]]\nname = \"a\"\nheight = 7\nbitrate = 500000\n").unwrap();
        let e = Presets::load(dir.path()).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}: invalid value for `video.renditions[0].height`: must be between 16 and 4320",
                bad.display()
            )
        );
    }

    #[test]
    fn config_names_the_preset_key_and_the_available_presets() {
        use crate::config::{Config, Overrides};
        let c = Config::parse("[streams.cam]\npreset = \"abr-4k\"\n", "t").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert_eq!(
            e,
            "invalid value for `streams.cam.preset`: unknown preset `abr-4k` (available: \
             abr-1080p, abr-720p, audio-only, copy-all, passthrough, screen, simulcast)"
        );
        let c = Config::parse(
            "[stream_defaults]\npreset = \"copy-all\"\n[streams.cam]\npreset = \"screen\"\n",
            "t",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.preset("cam").name, "screen");
        assert_eq!(c.preset("other").name, "copy-all");

        // server.presets_dir: its presets can be chosen; a broken one stops
        // the load, naming file and key; a configured directory must exist.
        let dir = tempfile::tempdir().unwrap();
        let presets = dir.path().join("presets");
        std::fs::create_dir(&presets).unwrap();
        std::fs::write(presets.join("mine.toml"), "[audio]\nchannels = 1\n").unwrap();
        let config = dir.path().join("whipgate.toml");
        let write = |preset: &str, presets_dir: &Path| {
            let text = format!(
                "[server]\npresets_dir = \"{}\"\n[streams.cam]\npreset = \"{preset}\"\n",
                presets_dir.display()
            );
            std::fs::write(&config, text).unwrap();
        };
        write("mine", &presets);
        let c = Config::load(Some(&config), &Overrides::default()).unwrap();
        assert_eq!(c.preset("cam").audio.channels, Some(1));
        // The flag (WHIPGATE_PRESETS_DIR) wins over the file.
        let other = dir.path().join("other");
        std::fs::create_dir(&other).unwrap();
        let o = Overrides {
            presets_dir: Some(other.clone()),
            ..Default::default()
        };
        let e = Config::load(Some(&config), &o).unwrap_err().to_string();
        assert!(
            e.contains("`streams.cam.preset`") && e.contains("`mine`"),
            "{e}"
        );
        std::fs::write(presets.join("bad.toml"), "[audio]\nchannels = 3\n").unwrap();
        let e = Config::load(Some(&config), &Overrides::default())
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            format!(
                "{}: invalid value for `audio.channels`: must be 1 or 2",
                presets.join("bad.toml").display()
            )
        );
        write("passthrough", &dir.path().join("missing"));
        let e = Config::load(Some(&config), &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("`server.presets_dir`"), "{e}");
    }
}
