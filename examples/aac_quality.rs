//! The quality and CPU check behind the choice of AAC encoder (#9).
//!
//! Runs a file's Opus audio through whipgate's Opus → AAC transcoder
//! (`OpusToAac`) once per encoder (`syom`, FFmpeg `fast`, FFmpeg `twoloop`),
//! decodes each AAC output with FFmpeg's AAC decoder, and compares it with
//! the decoded Opus, which is what the encoder was given:
//!
//! - CPU: this thread's CPU time for the whole transcode, minus the time the
//!   Opus decoding alone takes (measured in its own pass), in % of one core;
//! - SNR over the whole signal;
//! - NMR, the noise-to-mask ratio: per 2048-sample frame and critical band
//!   (Bark), the coding noise against a masking threshold made from the
//!   original's band energies with Schroeder's spreading function, Johnston's
//!   tonality-dependent offset (tonal: 14.5 + z dB, noise-like: 5.5 dB, from
//!   the spectral flatness) and the threshold in quiet. "mean NMR" is the
//!   mean over bands and frames (in dB, lower is better, below 0 is noise
//!   under the mask); "audible" is the share of frames with at least one
//!   band whose noise is over its mask (NMR > 0 dB), the "disturbed frames"
//!   of PEAQ-style measures.
//!
//! usage: cargo run --release --example aac_quality -- FILE [SECONDS] [BITRATE]
//! (FILE: anything with an Opus track, e.g. `ffmpeg -i music.flac -c:a
//! libopus -b:a 128k music.ogg`; default 60 s at 128000 b/s)

use std::sync::Arc;

use bytes::Bytes;
use ffmpeg_next as ff;
use whipgate::media::frame::{CLOCK_HZ, CodecParams, Frame};
use whipgate::transcode::audio::{AacCoder, AacSettings, OpusToAac};

const RATE: usize = 48_000;
const N: usize = 2048;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(path) = args.get(1) else {
        eprintln!("usage: aac_quality FILE [SECONDS] [BITRATE]");
        std::process::exit(2);
    };
    let seconds: f64 = args.get(2).map_or(60.0, |s| s.parse().expect("SECONDS"));
    let bitrate: u32 = args.get(3).map_or(128_000, |s| s.parse().expect("BITRATE"));
    ff::init().expect("ffmpeg init");
    ff::log::set_level(ff::log::Level::Fatal);

    let packets = opus_packets(path, seconds);
    let media = packets.len() as f64 * 0.02;
    let t = cpu_seconds();
    let reference = decode(&packets, "opus", None);
    let opus_cpu = cpu_seconds() - t;
    println!(
        "{path}: {media:.1} s of Opus, {bitrate} b/s AAC; Opus decoding alone {:.3}% of a core",
        opus_cpu / media * 100.0
    );
    println!(
        "{:<8} {:>9} {:>8} {:>8} {:>13} {:>9}",
        "encoder", "cpu_%", "kbit/s", "SNR_dB", "mean_NMR_dB", "audible_%"
    );
    for coder in [AacCoder::Syom, AacCoder::Fast, AacCoder::TwoLoop] {
        let settings = AacSettings {
            bitrate,
            coder,
            ..AacSettings::default()
        };
        let mut tc = OpusToAac::new(settings).expect("transcoder");
        let t = cpu_seconds();
        let mut aac = Vec::new();
        for (i, p) in packets.iter().enumerate() {
            let frame = Frame {
                pts: i as i64 * CLOCK_HZ / 50,
                dts: i as i64 * CLOCK_HZ / 50,
                key: true,
                data: p.clone(),
                params: Arc::new(CodecParams::Opus {
                    sample_rate: 48_000,
                    channels: 2,
                }),
            };
            aac.extend(tc.push(&frame).unwrap_or_default());
        }
        aac.extend(tc.flush().expect("flush"));
        let cpu = cpu_seconds() - t - opus_cpu;
        let bytes: usize = aac.iter().map(|f| f.data.len()).sum();
        let CodecParams::Aac { asc, .. } = &*tc.params() else {
            unreachable!()
        };
        let data: Vec<Bytes> = aac.iter().map(|f| f.data.clone()).collect();
        let decoded = decode(&data, "aac", Some(asc));
        let q = compare(&reference, &decoded);
        println!(
            "{:<8} {:>9.3} {:>8.1} {:>8.2} {:>13.2} {:>9.2}",
            coder.as_str(),
            cpu / media * 100.0,
            bytes as f64 * 8.0 / media / 1000.0,
            q.snr,
            q.mean_nmr,
            q.audible
        );
    }
}

/// This thread's CPU time, in seconds (Linux: /proc/thread-self/schedstat).
fn cpu_seconds() -> f64 {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").expect("schedstat");
    let ns: f64 = s
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .expect("schedstat");
    ns / 1e9
}

/// The first Opus track's packets, up to `seconds`.
fn opus_packets(path: &str, seconds: f64) -> Vec<Bytes> {
    let mut input = ff::format::input(path).expect("open input");
    let stream = input
        .streams()
        .find(|s| s.parameters().id() == ff::codec::Id::OPUS)
        .expect("no Opus track");
    let index = stream.index();
    let max = (seconds * 50.0) as usize;
    let mut out = Vec::new();
    for (s, packet) in input.packets() {
        if s.index() == index {
            if let Some(d) = packet.data() {
                out.push(Bytes::copy_from_slice(d));
            }
            if out.len() >= max {
                break;
            }
        }
    }
    out
}

/// Decodes packets with FFmpeg's `name` decoder to stereo planar float.
fn decode(packets: &[Bytes], name: &str, asc: Option<&Bytes>) -> [Vec<f32>; 2] {
    let codec = ff::decoder::find_by_name(name).expect("decoder");
    let mut ctx = ff::codec::Context::new_with_codec(codec);
    if let Some(asc) = asc {
        // SAFETY: extradata allocated with av_mallocz (padded), owned by the
        // context from here on.
        unsafe {
            let p = ctx.as_mut_ptr();
            let buf =
                ff::ffi::av_mallocz(asc.len() + ff::ffi::AV_INPUT_BUFFER_PADDING_SIZE as usize)
                    as *mut u8;
            std::ptr::copy_nonoverlapping(asc.as_ptr(), buf, asc.len());
            (*p).extradata = buf;
            (*p).extradata_size = asc.len() as i32;
        }
    }
    let mut dec = ctx.decoder().audio().expect("open decoder");
    let mut out = [Vec::new(), Vec::new()];
    let mut f = ff::frame::Audio::empty();
    let mut drain = |dec: &mut ff::decoder::Audio, out: &mut [Vec<f32>; 2]| {
        while dec.receive_frame(&mut f).is_ok() {
            assert_eq!(
                f.format(),
                ff::format::Sample::F32(ff::format::sample::Type::Planar)
            );
            for (c, ch) in out.iter_mut().enumerate() {
                let plane = c.min(f.planes() - 1);
                ch.extend_from_slice(&f.plane::<f32>(plane)[..f.samples()]);
            }
        }
    };
    for p in packets {
        let _ = dec.send_packet(&ff::Packet::copy(p));
        drain(&mut dec, &mut out);
    }
    let _ = dec.send_eof();
    drain(&mut dec, &mut out);
    out
}

struct Quality {
    snr: f64,
    mean_nmr: f64,
    audible: f64,
}

fn compare(x: &[Vec<f32>; 2], y: &[Vec<f32>; 2]) -> Quality {
    // The AAC output is delayed by the encoder's priming: find the lag.
    let n = x[0].len().min(y[0].len()).saturating_sub(8192);
    let probe = (RATE * 5).min(n.saturating_sub(RATE));
    let lag = (0..4096usize)
        .max_by(|&a, &b| {
            let c = |lag: usize| -> f64 {
                (RATE..RATE + probe)
                    .step_by(3)
                    .map(|i| f64::from(x[0][i]) * f64::from(y[0][i + lag]))
                    .sum()
            };
            c(a).total_cmp(&c(b))
        })
        .unwrap_or(0);
    let (mut es, mut ee) = (0.0f64, 0.0f64);
    for c in 0..2 {
        for i in 0..n {
            let d = f64::from(y[c][i + lag] - x[c][i]);
            es += f64::from(x[c][i]).powi(2);
            ee += d * d;
        }
    }

    let bark = |f: f64| 13.0 * (0.00076 * f).atan() + 3.5 * (f / 7500.0).powi(2).atan();
    // Critical bands over the FFT bins up to 16 kHz (every encoder here
    // low-passes at 15-16 kHz at this bitrate).
    let top = 16_000 * N / RATE;
    let band_of: Vec<usize> = (0..top)
        .map(|k| bark(k as f64 * RATE as f64 / N as f64) as usize)
        .collect();
    let bands = band_of.last().map_or(1, |b| b + 1);
    let centre: Vec<f64> = (0..bands).map(|b| b as f64 + 0.5).collect();
    // Threshold in quiet (Terhardt), full scale = 96 dB SPL, per bin.
    let quiet: Vec<f64> = (1..top)
        .map(|k| {
            let f = (k as f64 * RATE as f64 / N as f64 / 1000.0).max(0.02);
            let db =
                3.64 * f.powf(-0.8) - 6.5 * (-0.6 * (f - 3.3).powi(2)).exp() + 1e-3 * f.powi(4);
            10f64.powf((db - 96.0) / 10.0) * (N as f64 / 4.0)
        })
        .collect();
    let window: Vec<f64> = (0..N)
        .map(|i| 0.5 - 0.5 * (2.0 * std::f64::consts::PI * i as f64 / N as f64).cos())
        .collect();
    let (mut nmr_sum, mut nmr_count, mut frames, mut disturbed) = (0.0f64, 0usize, 0usize, 0usize);
    let mut per_band = vec![0usize; bands];
    for c in 0..2 {
        let mut pos = 0;
        while pos + N + lag < n {
            let sig = power_spectrum(&x[c][pos..pos + N], &window, top);
            let err: Vec<f64> = {
                let d: Vec<f32> = (0..N)
                    .map(|i| y[c][pos + lag + i] - x[c][pos + i])
                    .collect();
                power_spectrum(&d, &window, top)
            };
            let mut se = vec![0.0f64; bands];
            let mut ne = vec![0.0f64; bands];
            let mut quiet_b = vec![f64::MAX; bands];
            let (mut geo, mut ari, mut m) = (0.0f64, 0.0f64, 0usize);
            for k in 1..top {
                let b = band_of[k];
                se[b] += sig[k];
                ne[b] += err[k];
                quiet_b[b] = quiet_b[b].min(quiet[k - 1]);
                if sig[k] > 0.0 {
                    geo += sig[k].ln();
                    ari += sig[k];
                    m += 1;
                }
            }
            if m == 0 || ari / (m as f64) < 1e-9 {
                pos += N / 2;
                continue; // silence
            }
            let sfm_db = 10.0 * ((geo / m as f64).exp() / (ari / m as f64)).log10();
            let tonality = (sfm_db / -60.0).clamp(0.0, 1.0);
            let mut frame_disturbed = false;
            for b in 0..bands {
                // Schroeder's spreading of every band's energy onto band b.
                let spread: f64 = (0..bands)
                    .map(|j| {
                        let dz = centre[b] - centre[j] + 0.474;
                        let db = 15.81 + 7.5 * dz - 17.5 * (1.0 + dz * dz).sqrt();
                        se[j] * 10f64.powf(db / 10.0)
                    })
                    .sum();
                let offset = tonality * (14.5 + b as f64) + (1.0 - tonality) * 5.5;
                let width = (1..top).filter(|&k| band_of[k] == b).count() as f64;
                let mask = (spread * 10f64.powf(-offset / 10.0)).max(quiet_b[b] * width);
                if se[b] <= 0.0 {
                    continue;
                }
                let nmr = 10.0 * ((ne[b] + 1e-20) / mask).log10();
                nmr_sum += nmr.max(-30.0);
                nmr_count += 1;
                frame_disturbed |= nmr > 0.0;
                per_band[b] += usize::from(nmr > 0.0);
            }
            frames += 1;
            disturbed += usize::from(frame_disturbed);
            pos += N / 2;
        }
    }
    if std::env::var_os("AAC_QUALITY_BANDS").is_some() {
        let f: Vec<String> = per_band
            .iter()
            .map(|d| format!("{:.0}", *d as f64 * 100.0 / frames.max(1) as f64))
            .collect();
        eprintln!("disturbed % per Bark band: {}", f.join(" "));
    }
    Quality {
        snr: 10.0 * (es / ee.max(1e-20)).log10(),
        mean_nmr: nmr_sum / nmr_count.max(1) as f64,
        audible: disturbed as f64 * 100.0 / frames.max(1) as f64,
    }
}

/// |X(k)|² of a Hann-windowed frame, bins 0..top (a plain DFT through a
/// radix-2 FFT; N is a power of two).
fn power_spectrum(x: &[f32], window: &[f64], top: usize) -> Vec<f64> {
    let mut re: Vec<f64> = x
        .iter()
        .zip(window)
        .map(|(v, w)| f64::from(*v) * w)
        .collect();
    let mut im = vec![0.0f64; re.len()];
    fft(&mut re, &mut im);
    (0..top).map(|k| re[k] * re[k] + im[k] * im[k]).collect()
}

fn fft(re: &mut [f64], im: &mut [f64]) {
    let n = re.len();
    let mut j = 0;
    for i in 1..n {
        let mut bit = n >> 1;
        while j & bit != 0 {
            j ^= bit;
            bit >>= 1;
        }
        j |= bit;
        if i < j {
            re.swap(i, j);
            im.swap(i, j);
        }
    }
    let mut len = 2;
    while len <= n {
        let ang = -2.0 * std::f64::consts::PI / len as f64;
        for start in (0..n).step_by(len) {
            for k in 0..len / 2 {
                let (s, c) = (ang * k as f64).sin_cos();
                let (a, b) = (start + k, start + k + len / 2);
                let tr = re[b] * c - im[b] * s;
                let ti = re[b] * s + im[b] * c;
                re[b] = re[a] - tr;
                im[b] = im[a] - ti;
                re[a] += tr;
                im[a] += ti;
            }
        }
        len <<= 1;
    }
}
