//! The multivariant ("master") playlist of a stream with several
//! renditions: one `EXT-X-STREAM-INF` per rendition, with what its HLS
//! output measured. [`VariantMeter`] (sans-IO, fed by a rendition's output)
//! turns frames and segments into a [`Variant`]: `CODECS` from the real SPS
//! and AudioSpecificConfig, `RESOLUTION`, `FRAME-RATE`, and `BANDWIDTH`
//! (the highest segment bitrate so far) and `AVERAGE-BANDWIDTH` (all
//! segments) as RFC 8216 §4.3.4.2 defines them. [`run`] keeps the playlist
//! current as the figures change.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::watch;

use super::playlist::RenditionReport;
use super::storage;
use super::store::{self, Changes, Store};
use crate::media::frame::{CLOCK_HZ, CodecParams};

/// What the master playlist says of one rendition.
#[derive(Debug, Clone, PartialEq)]
pub struct Variant {
    /// `CODECS`, e.g. `avc1.64001f,mp4a.40.2`.
    pub codecs: String,
    /// `RESOLUTION`, when the rendition has video.
    pub resolution: Option<(u32, u32)>,
    /// `FRAME-RATE`.
    pub frame_rate: Option<f64>,
    /// `BANDWIDTH`: the peak segment bitrate, bits/s.
    pub peak_bps: u64,
    /// `AVERAGE-BANDWIDTH`, bits/s.
    pub average_bps: u64,
}

/// The `CODECS` name of a track (RFC 6381), when HLS knows one.
pub fn codec_name(params: &CodecParams) -> Option<String> {
    match params {
        // avc1.PPCCLL: profile_idc, the constraint flags and level_idc,
        // the three bytes after the NAL header.
        CodecParams::H264 { sps, .. } if sps.len() >= 4 => {
            Some(format!("avc1.{:02x}{:02x}{:02x}", sps[1], sps[2], sps[3]))
        }
        // mp4a.40.N: N is the AudioSpecificConfig's object type.
        CodecParams::Aac { asc, .. } => {
            let object_type = asc.first().map_or(2, |b| b >> 3);
            Some(format!("mp4a.40.{object_type}"))
        }
        CodecParams::Opus { .. } => Some("Opus".to_owned()),
        _ => None,
    }
}

/// Measures one rendition's HLS output.
#[derive(Debug, Default)]
pub struct VariantMeter {
    video: Option<Arc<CodecParams>>,
    audio: Option<Arc<CodecParams>>,
    /// Video frames since the first segment started.
    video_frames: u64,
    total_bytes: u64,
    total_ticks: f64,
    peak_bps: u64,
}

impl VariantMeter {
    /// A frame went into the output.
    pub fn frame(&mut self, params: &Arc<CodecParams>) {
        let slot = match params.codec().kind() {
            crate::media::frame::TrackKind::Video => {
                self.video_frames += 1;
                &mut self.video
            }
            crate::media::frame::TrackKind::Audio => &mut self.audio,
        };
        if slot.as_ref().is_none_or(|p| !Arc::ptr_eq(p, params)) {
            *slot = Some(params.clone());
        }
    }

    /// A segment of `duration` seconds and `bytes` was listed.
    pub fn segment(&mut self, bytes: usize, duration: f64) {
        if duration <= 0.0 {
            return;
        }
        let bps = (bytes as f64 * 8.0 / duration).round() as u64;
        self.peak_bps = self.peak_bps.max(bps);
        self.total_bytes += bytes as u64;
        self.total_ticks += duration * CLOCK_HZ as f64;
    }

    /// The figures so far; `None` before the first segment.
    pub fn variant(&self) -> Option<Variant> {
        if self.total_ticks <= 0.0 {
            return None;
        }
        let seconds = self.total_ticks / CLOCK_HZ as f64;
        let codecs: Vec<String> = [&self.video, &self.audio]
            .into_iter()
            .flatten()
            .filter_map(|p| codec_name(p))
            .collect();
        let resolution = match self.video.as_deref() {
            Some(CodecParams::H264 { width, height, .. }) => Some((*width, *height)),
            _ => None,
        };
        let frame_rate = resolution.map(|_| {
            let fps = self.video_frames as f64 / seconds;
            (fps * 1000.0).round() / 1000.0
        });
        Some(Variant {
            codecs: codecs.join(","),
            resolution,
            frame_rate,
            peak_bps: self.peak_bps,
            average_bps: (self.total_bytes as f64 * 8.0 / seconds).round() as u64,
        })
    }
}

/// The playlist for `variants` (rendition name and figures, in order);
/// each rendition's media playlist is `NAME/index.m3u8`.
pub fn render(variants: &[(&str, &Variant)], version: u8) -> String {
    let mut out = format!("#EXTM3U\n#EXT-X-VERSION:{version}\n#EXT-X-INDEPENDENT-SEGMENTS\n");
    for (name, v) in variants {
        out.push_str(&format!(
            "#EXT-X-STREAM-INF:BANDWIDTH={},AVERAGE-BANDWIDTH={},CODECS=\"{}\"",
            v.peak_bps, v.average_bps, v.codecs
        ));
        if let Some((w, h)) = v.resolution {
            out.push_str(&format!(",RESOLUTION={w}x{h}"));
        }
        if let Some(fps) = v.frame_rate {
            out.push_str(&format!(",FRAME-RATE={fps:.3}"));
        }
        out.push_str(&format!("\n{name}/index.m3u8\n"));
    }
    out
}

/// What the renditions of a ladder know of each other.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RenditionState {
    /// For the master playlist, once a segment is out.
    pub variant: Option<Variant>,
    /// LL-HLS: the live edge other renditions report
    /// ([`Playlist::report_edge`](super::playlist::Playlist::report_edge)).
    pub edge: Option<(u64, Option<u32>)>,
}

/// A rendition's output's link to the ladder: its slot in the stream's
/// list, and the names of all.
#[derive(Debug, Clone)]
pub struct Report {
    pub tx: watch::Sender<Vec<RenditionState>>,
    pub index: usize,
    pub names: Arc<[String]>,
}

impl Report {
    fn update(&self, f: impl FnOnce(&mut RenditionState) -> bool) {
        self.tx
            .send_if_modified(|all| all.get_mut(self.index).is_some_and(f));
    }

    pub fn send(&self, variant: Option<Variant>) {
        self.update(|slot| {
            let changed = slot.variant != variant;
            slot.variant = variant;
            changed
        });
    }

    /// Records this rendition's edge; returns the other renditions' edges
    /// as this one's playlist reports them.
    pub fn edges(&self, edge: Option<(u64, Option<u32>)>) -> Vec<RenditionReport> {
        self.update(|slot| {
            let changed = slot.edge != edge;
            slot.edge = edge;
            changed
        });
        let all = self.tx.borrow();
        all.iter()
            .zip(self.names.iter())
            .enumerate()
            .filter(|(i, _)| *i != self.index)
            .filter_map(|(_, (state, name))| {
                let (last_msn, last_part) = state.edge?;
                Some(RenditionReport {
                    uri: format!("../{name}/index.m3u8"),
                    last_msn,
                    last_part,
                })
            })
            .collect()
    }
}

/// Keeps `dir/index.m3u8` (on disk and in memory) listing the renditions
/// `names` that have figures, until `shutdown`. Renditions appear once
/// their first segment is out.
pub async fn run(
    dir: PathBuf,
    names: Vec<String>,
    mut variants: watch::Receiver<Vec<RenditionState>>,
    version: u8,
    mut shutdown: watch::Receiver<bool>,
) {
    let span = tracing::info_span!("hls-master", dir = %dir.display());
    let storage = match storage::open(&dir) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(parent: &span, error = %e, "cannot open the HLS storage; the master playlist is served from memory only");
            None
        }
    };
    // The renditions clear their own directories; an earlier run without
    // a ladder may have left files next to them.
    if storage.as_ref().is_some_and(|s| s.kind() == "local")
        && let Err(e) = clear_files(&dir).await
    {
        tracing::warn!(parent: &span, error = %e, "cannot clear the stream's HLS directory");
    }
    let store = Arc::new(Store::new());
    store::register(&dir, store.clone());
    let mut last = String::new();
    loop {
        let text = {
            let all = variants.borrow_and_update();
            let listed: Vec<(&str, &Variant)> = names
                .iter()
                .zip(all.iter())
                .filter_map(|(n, v)| Some((n.as_str(), v.variant.as_ref()?)))
                .collect();
            (!listed.is_empty()).then(|| render(&listed, version))
        };
        if let Some(text) = text.filter(|t| *t != last) {
            let data = Bytes::from(text.clone());
            store.apply(Changes {
                playlist: Some((data.clone(), None)),
                ..Default::default()
            });
            if let Some(storage) = storage.as_ref() {
                storage.put("index.m3u8", data, &span).await;
            }
            tracing::debug!(parent: &span, "master playlist updated");
            last = text;
        }
        tokio::select! {
            changed = variants.changed() => if changed.is_err() { break },
            _ = shutdown.changed() => break,
        }
    }
    store::unregister(&dir, &store);
}

/// Removes the files (not the rendition directories) an earlier run left.
async fn clear_files(dir: &std::path::Path) -> std::io::Result<()> {
    tokio::fs::create_dir_all(dir).await?;
    let mut entries = tokio::fs::read_dir(dir).await?;
    while let Some(entry) = entries.next_entry().await? {
        if entry.file_type().await?.is_file() {
            tokio::fs::remove_file(entry.path()).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h264(sps: &[u8], width: u32, height: u32) -> Arc<CodecParams> {
        Arc::new(CodecParams::H264 {
            sps: Bytes::copy_from_slice(sps),
            pps: Bytes::from_static(&[0x68, 0xce]),
            width,
            height,
        })
    }

    fn aac() -> Arc<CodecParams> {
        Arc::new(CodecParams::Aac {
            asc: Bytes::from_static(&[0x11, 0x90]),
            sample_rate: 48_000,
            channels: 2,
        })
    }

    #[test]
    fn codecs_come_from_the_parameters() {
        assert_eq!(
            codec_name(&h264(&[0x67, 0x64, 0x00, 0x1f, 0xac], 1280, 720)).as_deref(),
            Some("avc1.64001f")
        );
        assert_eq!(
            codec_name(&h264(&[0x67, 0x42, 0xc0, 0x1e], 640, 360)).as_deref(),
            Some("avc1.42c01e")
        );
        assert_eq!(codec_name(&aac()).as_deref(), Some("mp4a.40.2"));
        let he = CodecParams::Aac {
            asc: Bytes::from_static(&[0x2b, 0x92]),
            sample_rate: 24_000,
            channels: 2,
        };
        assert_eq!(codec_name(&he).as_deref(), Some("mp4a.40.5"));
        // A truncated SPS names nothing rather than a wrong profile.
        assert_eq!(codec_name(&h264(&[0x67, 0x64], 16, 16)), None);
    }

    #[test]
    fn the_meter_measures_peak_and_average_and_frame_rate() {
        let mut m = VariantMeter::default();
        assert_eq!(m.variant(), None);
        let video = h264(&[0x67, 0x64, 0x00, 0x1e], 854, 480);
        let audio = aac();
        for _ in 0..60 {
            m.frame(&video);
            m.frame(&audio);
        }
        m.segment(250_000, 2.0); // 1 Mbit/s
        for _ in 0..60 {
            m.frame(&video);
        }
        m.segment(500_000, 2.0); // 2 Mbit/s
        let v = m.variant().unwrap();
        assert_eq!(
            v,
            Variant {
                codecs: "avc1.64001e,mp4a.40.2".into(),
                resolution: Some((854, 480)),
                frame_rate: Some(30.0),
                peak_bps: 2_000_000,
                average_bps: 1_500_000,
            }
        );
    }

    #[test]
    fn the_playlist_lists_each_rendition_with_its_figures() {
        let hd = Variant {
            codecs: "avc1.64001f,mp4a.40.2".into(),
            resolution: Some((1280, 720)),
            frame_rate: Some(29.97),
            peak_bps: 3_100_000,
            average_bps: 2_800_000,
        };
        let audio = Variant {
            codecs: "mp4a.40.2".into(),
            resolution: None,
            frame_rate: None,
            peak_bps: 140_000,
            average_bps: 130_000,
        };
        let text = render(&[("720p", &hd), ("audio", &audio)], 3);
        assert_eq!(
            text,
            "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-INDEPENDENT-SEGMENTS\n\
             #EXT-X-STREAM-INF:BANDWIDTH=3100000,AVERAGE-BANDWIDTH=2800000,\
             CODECS=\"avc1.64001f,mp4a.40.2\",RESOLUTION=1280x720,FRAME-RATE=29.970\n\
             720p/index.m3u8\n\
             #EXT-X-STREAM-INF:BANDWIDTH=140000,AVERAGE-BANDWIDTH=130000,\
             CODECS=\"mp4a.40.2\"\n\
             audio/index.m3u8\n"
        );
        // m3u8-rs reads it as a master playlist with both variants.
        match m3u8_rs::parse_playlist_res(text.as_bytes()) {
            Ok(m3u8_rs::Playlist::MasterPlaylist(m)) => {
                assert_eq!(m.variants.len(), 2);
                assert_eq!(m.variants[0].bandwidth, 3_100_000);
                assert_eq!(m.variants[0].average_bandwidth, Some(2_800_000));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn reports_change_only_their_slot_and_see_the_others() {
        let (tx, rx) = watch::channel(vec![RenditionState::default(); 3]);
        let names: Arc<[String]> = ["720p", "480p", "360p"].map(String::from).into();
        let report = |index| Report {
            tx: tx.clone(),
            index,
            names: names.clone(),
        };
        let v = Variant {
            codecs: "mp4a.40.2".into(),
            resolution: None,
            frame_rate: None,
            peak_bps: 1,
            average_bps: 1,
        };
        report(1).send(Some(v.clone()));
        assert_eq!(rx.borrow()[1].variant, Some(v));
        assert_eq!(rx.borrow()[0], RenditionState::default());
        assert!(report(0).edges(Some((4, Some(2)))).is_empty());
        assert_eq!(report(2).edges(Some((4, None))).len(), 1);
        assert_eq!(
            report(1).edges(None),
            vec![
                RenditionReport {
                    uri: "../720p/index.m3u8".into(),
                    last_msn: 4,
                    last_part: Some(2),
                },
                RenditionReport {
                    uri: "../360p/index.m3u8".into(),
                    last_msn: 4,
                    last_part: None,
                },
            ]
        );
        // Out of range: ignored, no panic.
        report(5).send(None);
        assert_eq!(report(5).edges(None).len(), 2, "the two with an edge");
    }
}
