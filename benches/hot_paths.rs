//! Micro-benchmarks of the sans-IO hot paths, on the real frames of
//! `samples/sample.mkv` (640x360 H264 at 30 fps; its audio encoded to AAC by
//! the ffmpeg CLI, as tests/support/sample_frames.rs does):
//!
//! - `depacketize`: what the WebRTC ingest does per video frame str0m hands
//!   over: [`H264Assembler::push`] over the sample's 300 access units (10 s),
//!   alone and behind the RTP → stream timeline mapping ([`Timeline::map`]);
//! - `ts_mux`: one second of video + audio through [`TsMuxer::write_frame`],
//!   and through [`Segmenter::push`] (the HLS output's per-frame call);
//! - `flv`: the same second as RTMP message bodies ([`flv::avc_frame`],
//!   [`flv::aac_frame`], what the push does per frame), and as FLV file tags;
//! - `playlist`: [`Playlist::render`] of a live playlist of 6 and 100 segments.
//!
//! Run them with
//!
//!     cargo bench --bench hot_paths
//!
//! (`cargo bench --bench hot_paths -- ts_mux` runs one group; criterion's
//! other options work too). Under `cargo test` (no `--bench` argument) every
//! case runs once, unoptimized, as a smoke test. That mode is ours rather
//! than criterion's, whose argument parser refuses the libtest options that
//! `cargo test -- --test-threads=2` hands to every test binary.

use std::hint::black_box;
use std::rc::Rc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use whipgate::hls::playlist::{Playlist, PlaylistConfig};
use whipgate::hls::segmenter::{Segment, Segmenter, SegmenterConfig};
use whipgate::hls::ts::{PACKET_SIZE, TsMuxer};
use whipgate::media::frame::{CLOCK_HZ, Frame, TrackKind};
use whipgate::media::h264::H264Assembler;
use whipgate::media::time::Timeline;
use whipgate::rtmp::flv::{self, FlvFile, TagKind};

#[path = "../tests/support/sample_frames.rs"]
mod sample_frames;

/// Per benchmark: short, so the whole suite runs in about a minute.
const WARM_UP: Duration = Duration::from_secs(1);
const MEASUREMENT: Duration = Duration::from_secs(3);
const SAMPLES: usize = 30;

/// RTP timestamp of the first video frame: close enough to 2^32 that the
/// timestamps wrap 5 s into the sample, as they do somewhere in any long
/// publication.
const RTP_BASE: u32 = u32::MAX - 5 * CLOCK_HZ as u32;

/// The sample, as the hot paths see it.
struct Sample {
    /// Every video access unit (Annex B, SPS and PPS in front of each IDR;
    /// what a browser's depacketized frames look like), in decode order.
    video: Vec<Frame>,
    /// The first second of video and audio, in decode order.
    second: Vec<(TrackKind, Frame)>,
}

impl Sample {
    fn load() -> Sample {
        let frames =
            sample_frames::load_sample_frames().expect("loading samples/sample.mkv (needs ffmpeg)");
        let kind = |f: &Frame| f.codec().kind();
        let video: Vec<Frame> = frames
            .iter()
            .filter(|f| kind(f) == TrackKind::Video)
            .cloned()
            .collect();
        let second: Vec<(TrackKind, Frame)> = frames
            .iter()
            .filter(|f| f.dts < CLOCK_HZ)
            .map(|f| (kind(f), f.clone()))
            .collect();
        assert!(video.first().is_some_and(|f| f.key), "starts on a keyframe");
        Sample { video, second }
    }

    fn video_bytes(&self) -> usize {
        self.video.iter().map(|f| f.data.len()).sum()
    }

    fn second_bytes(&self) -> usize {
        self.second.iter().map(|(_, f)| f.data.len()).sum()
    }
}

/// One benchmark: `run` does one iteration and returns the size of what it
/// made (checked to be non-zero in test mode, and kept from the optimizer).
struct Case {
    group: &'static str,
    name: String,
    throughput: Throughput,
    run: Box<dyn FnMut() -> usize>,
}

fn case(
    group: &'static str,
    name: impl Into<String>,
    throughput: Throughput,
    run: impl FnMut() -> usize + 'static,
) -> Case {
    Case {
        group,
        name: name.into(),
        throughput,
        run: Box::new(run),
    }
}

fn elements(n: usize) -> Throughput {
    Throughput::Elements(n as u64)
}

fn depacketize(sample: &Rc<Sample>) -> Vec<Case> {
    let frames = elements(sample.video.len());
    let s = Rc::clone(sample);
    let assembler = case("depacketize", "h264_assembler", frames.clone(), move || {
        let mut assembler = H264Assembler::new();
        let mut out = 0;
        for f in &s.video {
            if let Some(frame) = assembler.push(&f.data, f.pts, true).frame {
                out += frame.data.len();
            }
        }
        debug_assert_eq!(assembler.stats().frames_out, s.video.len() as u64);
        out
    });

    let s = Rc::clone(sample);
    // Arrival instants: on time, with a few ms of deterministic jitter.
    let start = Instant::now();
    let arrivals: Vec<(u32, Instant)> = s
        .video
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let rtp = RTP_BASE.wrapping_add(f.pts as u32);
            let jitter = Duration::from_millis((i % 5) as u64);
            let due = Duration::from_nanos((f.pts * 1_000_000_000 / CLOCK_HZ) as u64);
            (rtp, start + due + jitter)
        })
        .collect();
    let timeline = case("depacketize", "timeline_and_assembler", frames, move || {
        let mut timeline = Timeline::new();
        let mut assembler = H264Assembler::new();
        let mut out = 0;
        for (f, &(rtp, arrival)) in s.video.iter().zip(&arrivals) {
            let Some(pts) = timeline.map(TrackKind::Video, 90_000, rtp, arrival) else {
                continue;
            };
            if let Some(frame) = assembler.push(&f.data, pts, true).frame {
                out += frame.data.len();
            }
        }
        debug_assert_eq!(assembler.stats().frames_out, s.video.len() as u64);
        out
    });
    vec![assembler, timeline]
}

fn ts_mux(sample: &Rc<Sample>) -> Vec<Case> {
    let frames = elements(sample.second.len());
    let s = Rc::clone(sample);
    let mut out = Vec::new();
    let muxer = case("ts_mux", "ts_muxer_1s", frames.clone(), move || {
        let mut muxer = TsMuxer::new(true, true);
        out.clear();
        muxer.write_tables(&mut out);
        for (kind, f) in &s.second {
            muxer.write_frame(*kind, f, &mut out).expect("muxable");
        }
        debug_assert_eq!(out.len() % PACKET_SIZE, 0);
        out.len()
    });

    let s = Rc::clone(sample);
    let segmenter = case("ts_mux", "segmenter_1s", frames, move || {
        let mut segmenter = Segmenter::new(SegmenterConfig::default(), true, true);
        for (kind, f) in &s.second {
            let cut = segmenter
                .push(*kind, f, 1_700_000_000_000)
                .expect("muxable");
            debug_assert!(cut.is_none(), "no cut within the first second");
        }
        let segment = segmenter.finish().expect("a segment");
        debug_assert!(segment.starts_with_keyframe);
        segment.data.len()
    });
    vec![muxer, segmenter]
}

/// The FLV body of one frame and its timestamp, as the RTMP push makes them.
fn flv_body(kind: TrackKind, f: &Frame) -> (TagKind, u32, bytes::Bytes) {
    match kind {
        TrackKind::Video => {
            let body =
                flv::avc_frame(&f.data, f.key, flv::cts_ms(f.pts, f.dts)).expect("an AVC frame");
            (TagKind::Video, flv::timestamp_ms(f.dts), body)
        }
        TrackKind::Audio => (
            TagKind::Audio,
            flv::timestamp_ms(f.pts),
            flv::aac_frame(&f.data),
        ),
    }
}

fn flv(sample: &Rc<Sample>) -> Vec<Case> {
    let frames = elements(sample.second.len());
    let s = Rc::clone(sample);
    let bodies = case("flv", "rtmp_bodies_1s", frames.clone(), move || {
        s.second
            .iter()
            .map(|(kind, f)| black_box(flv_body(*kind, f)).2.len())
            .sum()
    });

    let s = Rc::clone(sample);
    let file = case("flv", "file_tags_1s", frames, move || {
        let mut file = FlvFile::new(true, true);
        for (kind, f) in &s.second {
            let (tag, ts, body) = flv_body(*kind, f);
            file.push(tag, ts, &body).expect("a tag");
        }
        file.take().len()
    });
    vec![bodies, file]
}

/// A live playlist that has slid: `window` segments listed out of
/// `window + 10` made, 2 s each (the last one shorter), one discontinuity
/// in the window.
fn live_playlist(window: usize) -> Playlist {
    let mut playlist = Playlist::new(PlaylistConfig {
        target_duration: Duration::from_secs(2),
        window,
    });
    let made = window as u64 + 10;
    for sequence in 0..made {
        let duration = if sequence + 1 == made { 1.4 } else { 2.002 };
        playlist.push(&Segment {
            sequence,
            duration,
            data: Vec::new(),
            discontinuity: sequence == made - 3,
            program_date_time_ms: 1_700_000_000_000 + sequence as i64 * 2002,
            starts_with_keyframe: true,
        });
    }
    playlist
}

fn playlist() -> Vec<Case> {
    [6, 100]
        .into_iter()
        .map(|window| {
            let playlist = live_playlist(window);
            let text = playlist.render();
            debug_assert_eq!(text.matches("#EXTINF").count(), window);
            case(
                "playlist",
                format!("render_{window}"),
                Throughput::Bytes(text.len() as u64),
                move || playlist.render().len(),
            )
        })
        .collect()
}

fn cases() -> Vec<Case> {
    let sample = Rc::new(Sample::load());
    eprintln!(
        "hot_paths: {} video frames ({} bytes) in 10 s; first second: {} frames ({} bytes)",
        sample.video.len(),
        sample.video_bytes(),
        sample.second.len(),
        sample.second_bytes(),
    );
    let mut all = depacketize(&sample);
    all.extend(ts_mux(&sample));
    all.extend(flv(&sample));
    all.extend(playlist());
    all
}

fn main() {
    let benchmarking = std::env::args().skip(1).any(|a| a == "--bench");
    let mut cases = cases();
    if !benchmarking {
        for case in &mut cases {
            eprint!("Testing {}/{} ... ", case.group, case.name);
            assert!(
                (case.run)() > 0,
                "{}/{} made nothing",
                case.group,
                case.name
            );
            eprintln!("Success");
        }
        return;
    }

    let mut criterion = Criterion::default()
        .warm_up_time(WARM_UP)
        .measurement_time(MEASUREMENT)
        .sample_size(SAMPLES)
        .without_plots()
        .configure_from_args();
    let mut rest = cases.as_mut_slice();
    while let Some(first) = rest.first() {
        let name = first.group;
        let len = rest.iter().take_while(|c| c.group == name).count();
        let (same, tail) = rest.split_at_mut(len);
        let mut group = criterion.benchmark_group(name);
        for case in same {
            group.throughput(case.throughput.clone());
            group.bench_function(case.name.as_str(), |b| b.iter(|| black_box((case.run)())));
        }
        group.finish();
        rest = tail;
    }
    criterion.final_summary();
}
