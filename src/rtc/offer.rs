//! What a WHIP offer asks for, read from the SDP text: the media sections,
//! their direction and the codecs they offer. This decides 422s before the
//! WebRTC stack sees the offer, and which H264 payload types to mirror so that
//! every profile an encoder offers is accepted.

use std::collections::HashMap;

use crate::media::frame::Codec;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaKind {
    Audio,
    Video,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload {
    pub pt: u8,
    /// Codec name in lower case (`h264`, `opus`, `rtx`, ...).
    pub codec: String,
    pub clock_rate: u32,
    pub channels: Option<u8>,
    /// `a=fmtp` parameters, keys in lower case.
    pub fmtp: HashMap<String, String>,
}

impl Payload {
    pub fn fmtp_u32(&self, key: &str, radix: u32) -> Option<u32> {
        self.fmtp
            .get(key)
            .and_then(|v| u32::from_str_radix(v.trim(), radix).ok())
    }
}

#[derive(Debug, Clone)]
pub struct MediaSection {
    pub kind: MediaKind,
    pub port_zero: bool,
    /// `sendonly`, `sendrecv`, `recvonly`, `inactive` (default `sendrecv`).
    pub direction: String,
    pub payloads: Vec<Payload>,
}

impl MediaSection {
    /// Payload types of H264 with packetization-mode=1, with their RTX pt.
    pub fn h264_mode1(&self) -> Vec<(&Payload, Option<u8>)> {
        self.payloads
            .iter()
            .filter(|p| p.codec == "h264" && p.fmtp_u32("packetization-mode", 10) == Some(1))
            .map(|p| {
                let rtx = self
                    .payloads
                    .iter()
                    .find(|r| r.codec == "rtx" && r.fmtp_u32("apt", 10) == Some(p.pt as u32))
                    .map(|r| r.pt);
                (p, rtx)
            })
            .collect()
    }

    /// The first payload of VP8, VP9 or AV1 (`codec`), any profile.
    pub fn transcoded_video(&self, codec: Codec) -> Option<&Payload> {
        let name = match codec {
            Codec::Vp8 => "vp8",
            Codec::Vp9 => "vp9",
            Codec::Av1 => "av1",
            Codec::H264 | Codec::Opus | Codec::Aac => return None,
        };
        self.payloads
            .iter()
            .find(|p| p.codec == name && p.clock_rate == 90000)
    }

    pub fn opus(&self) -> Option<&Payload> {
        self.payloads
            .iter()
            .find(|p| p.codec == "opus" && p.clock_rate == 48000)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OfferError {
    #[error("{0}")]
    Malformed(String),
    #[error("{0}")]
    Unacceptable(String),
}

/// The media a publisher will send, once the offer passed [`check`].
#[derive(Debug, Clone)]
pub struct Accepted {
    pub video: Option<MediaSection>,
    pub audio: Option<MediaSection>,
    /// The video codec to negotiate: H264 whenever offered, else the first
    /// of VP8, VP9, AV1 offered (the cheapest to decode).
    pub video_codec: Option<Codec>,
}

/// Lines an offer may have. Browsers send 100 to 300; thousands only come
/// from someone probing the parser.
pub const MAX_LINES: usize = 2000;

pub fn parse(sdp: &str) -> Result<Vec<MediaSection>, OfferError> {
    let mut sections: Vec<MediaSection> = Vec::new();
    if !sdp.trim_start().starts_with("v=") {
        return Err(OfferError::Malformed("an SDP must start with v=".into()));
    }
    if sdp.lines().nth(MAX_LINES).is_some() {
        return Err(OfferError::Malformed(format!(
            "the offer has more than {MAX_LINES} lines"
        )));
    }
    for line in sdp.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(m) = line.strip_prefix("m=") {
            let mut parts = m.split_whitespace();
            let kind = match parts.next() {
                Some("audio") => MediaKind::Audio,
                Some("video") => MediaKind::Video,
                Some(_) => MediaKind::Other,
                None => return Err(OfferError::Malformed("empty m= line".into())),
            };
            let port_zero = parts.next() == Some("0");
            sections.push(MediaSection {
                kind,
                port_zero,
                direction: "sendrecv".into(),
                payloads: Vec::new(),
            });
            continue;
        }
        let Some(section) = sections.last_mut() else {
            continue;
        };
        let Some(attr) = line.strip_prefix("a=") else {
            continue;
        };
        match attr {
            "sendonly" | "sendrecv" | "recvonly" | "inactive" => section.direction = attr.into(),
            _ => {}
        }
        if let Some(rest) = attr.strip_prefix("rtpmap:") {
            let (pt, enc) = rest
                .split_once(' ')
                .ok_or_else(|| OfferError::Malformed(format!("bad rtpmap `{line}`")))?;
            let pt: u8 = pt
                .parse()
                .map_err(|_| OfferError::Malformed(format!("bad payload type in `{line}`")))?;
            let mut enc = enc.trim().split('/');
            let codec = enc.next().unwrap_or_default().to_ascii_lowercase();
            let clock_rate = enc
                .next()
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| OfferError::Malformed(format!("bad clock rate in `{line}`")))?;
            let channels = enc.next().and_then(|c| c.parse().ok());
            section.payloads.retain(|p| p.pt != pt);
            let fmtp = HashMap::new();
            section.payloads.push(Payload {
                pt,
                codec,
                clock_rate,
                channels,
                fmtp,
            });
        } else if let Some(rest) = attr.strip_prefix("fmtp:") {
            let Some((pt, params)) = rest.split_once(' ') else {
                continue;
            };
            let Ok(pt) = pt.parse::<u8>() else { continue };
            let Some(p) = section.payloads.iter_mut().find(|p| p.pt == pt) else {
                continue;
            };
            for kv in params.split(';') {
                if let Some((k, v)) = kv.split_once('=') {
                    p.fmtp
                        .insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
                }
            }
        }
    }
    Ok(sections)
}

/// Applies the WHIP rules: at most one audio and one video section, each
/// `sendonly` or `sendrecv`, each with a codec we take (H264 with
/// packetization-mode 1, or VP8, VP9 or AV1 when `accept_non_h264`; Opus).
/// Sections other than audio/video (data channels) are ignored. Anything
/// else refuses the whole offer.
pub fn check(sections: Vec<MediaSection>, accept_non_h264: bool) -> Result<Accepted, OfferError> {
    let mut video = None;
    let mut video_codec = None;
    let mut audio = None;
    for s in sections {
        if s.kind == MediaKind::Other || s.port_zero {
            continue;
        }
        let what = if s.kind == MediaKind::Video {
            "video"
        } else {
            "audio"
        };
        if s.direction != "sendonly" && s.direction != "sendrecv" {
            return Err(OfferError::Unacceptable(format!(
                "the {what} section is `{}`: a WHIP offer must send media (sendonly or sendrecv)",
                s.direction
            )));
        }
        let slot = if s.kind == MediaKind::Video {
            let transcoded = Codec::TRANSCODED_VIDEO
                .into_iter()
                .find(|&c| accept_non_h264 && s.transcoded_video(c).is_some());
            video_codec = if !s.h264_mode1().is_empty() {
                Some(Codec::H264)
            } else if transcoded.is_some() {
                transcoded
            } else {
                let offered: Vec<_> = s.payloads.iter().map(|p| p.codec.as_str()).collect();
                let wanted = if accept_non_h264 {
                    "H264 with packetization-mode=1, VP8, VP9 or AV1"
                } else {
                    "H264 with packetization-mode=1 (this stream's preset does not transcode \
                     VP8, VP9 or AV1)"
                };
                return Err(OfferError::Unacceptable(format!(
                    "no acceptable video codec: {wanted} is required, offered {offered:?}"
                )));
            };
            &mut video
        } else {
            if s.opus().is_none() {
                return Err(OfferError::Unacceptable(
                    "no acceptable audio codec: Opus/48000 is required".into(),
                ));
            }
            &mut audio
        };
        if slot.is_some() {
            return Err(OfferError::Unacceptable(format!(
                "more than one {what} track is not supported"
            )));
        }
        *slot = Some(s);
    }
    if video.is_none() && audio.is_none() {
        return Err(OfferError::Unacceptable(
            "the offer has no audio or video to publish".into(),
        ));
    }
    Ok(Accepted {
        video,
        audio,
        video_codec,
    })
}

/// The RIDs of the offer's simulcast layers (`a=simulcast:send`), in the
/// order the publisher lists them (RFC 8853 §5.2: its preference); the
/// first alternative of each, without the paused marker.
pub fn simulcast_rids(offer: &str) -> Vec<String> {
    let Some(value) = offer
        .lines()
        .find_map(|l| l.trim_end().strip_prefix("a=simulcast:"))
    else {
        return Vec::new();
    };
    let mut words = value.split_whitespace();
    while let Some(direction) = words.next() {
        let list = words.next().unwrap_or_default();
        if direction == "send" {
            return list
                .split(';')
                .filter_map(|layer| layer.split(',').next())
                .map(|rid| rid.trim_start_matches('~').to_owned())
                .filter(|rid| !rid.is_empty())
                .collect();
        }
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHROME: &str = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n\
        m=audio 9 UDP/TLS/RTP/SAVPF 111 63\r\na=sendonly\r\na=rtpmap:111 opus/48000/2\r\n\
        a=fmtp:111 minptime=10;useinbandfec=1\r\na=rtpmap:63 red/48000/2\r\n\
        m=video 9 UDP/TLS/RTP/SAVPF 96 97 102 103 127 121\r\na=sendonly\r\n\
        a=rtpmap:96 VP8/90000\r\na=rtpmap:97 rtx/90000\r\na=fmtp:97 apt=96\r\n\
        a=rtpmap:102 H264/90000\r\na=fmtp:102 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42001f\r\n\
        a=rtpmap:103 rtx/90000\r\na=fmtp:103 apt=102\r\n\
        a=rtpmap:127 H264/90000\r\na=fmtp:127 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=640032\r\n\
        a=rtpmap:121 rtx/90000\r\na=fmtp:121 apt=127\r\n";

    #[test]
    fn picks_h264_from_a_vp8_first_offer() {
        let a = check(parse(CHROME).unwrap(), false).unwrap();
        let v = a.video.unwrap();
        let h: Vec<_> = v
            .h264_mode1()
            .iter()
            .map(|(p, rtx)| (p.pt, *rtx, p.fmtp_u32("profile-level-id", 16)))
            .collect();
        assert_eq!(
            h,
            vec![
                (102, Some(103), Some(0x42001f)),
                (127, Some(121), Some(0x640032))
            ]
        );
        assert_eq!(a.audio.unwrap().opus().unwrap().pt, 111);
    }

    #[test]
    fn refuses_recvonly_and_missing_codecs() {
        let recv = CHROME.replace("a=sendonly", "a=recvonly");
        assert!(matches!(
            check(parse(&recv).unwrap(), false),
            Err(OfferError::Unacceptable(_))
        ));
        let vp8_only =
            "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=sendonly\r\na=rtpmap:96 VP8/90000\r\n";
        let e = check(parse(vp8_only).unwrap(), false).unwrap_err();
        assert!(e.to_string().contains("H264"), "{e}");
        let two = format!(
            "{CHROME}m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=sendonly\r\na=rtpmap:111 opus/48000/2\r\n"
        );
        assert!(check(parse(&two).unwrap(), false).is_err());
    }

    /// Chrome's video section without H264 (as when H264 is filtered out
    /// with setCodecPreferences, or absent from the build): VP8, VP9
    /// profiles 0 and 2, AV1.
    const NO_H264: &str = "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 45 98 100 96\r\na=sendonly\r\n\
        a=rtpmap:45 AV1/90000\r\na=fmtp:45 level-idx=5;profile=0;tier=0\r\n\
        a=rtpmap:98 VP9/90000\r\na=fmtp:98 profile-id=0\r\n\
        a=rtpmap:100 VP9/90000\r\na=fmtp:100 profile-id=2\r\n\
        a=rtpmap:96 VP8/90000\r\n";

    #[test]
    fn without_h264_the_cheapest_to_decode_wins() {
        let codec = |sdp: &str, accept| check(parse(sdp).unwrap(), accept).map(|a| a.video_codec);
        assert_eq!(codec(NO_H264, true), Ok(Some(Codec::Vp8)));
        let no_vp8 = NO_H264.replace("a=rtpmap:96 VP8/90000\r\n", "");
        assert_eq!(codec(&no_vp8, true), Ok(Some(Codec::Vp9)));
        let av1_only = "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 45\r\na=sendonly\r\n\
            a=rtpmap:45 AV1/90000\r\n";
        assert_eq!(codec(av1_only, true), Ok(Some(Codec::Av1)));
        // H264 whenever offered, even last.
        assert_eq!(codec(CHROME, true), Ok(Some(Codec::H264)));
        // A preset that transcodes nothing refuses them all.
        for sdp in [NO_H264, &no_vp8, av1_only] {
            let e = codec(sdp, false).unwrap_err();
            assert!(e.to_string().contains("does not transcode"), "{e}");
        }
        // VP9 payload lookup, any profile.
        let s = &parse(&no_vp8).unwrap()[0];
        assert_eq!(s.transcoded_video(Codec::Vp9).map(|p| p.pt), Some(98));
        assert_eq!(s.transcoded_video(Codec::Vp8), None);
        assert_eq!(s.transcoded_video(Codec::H264), None);
    }

    #[test]
    fn sendrecv_is_accepted_and_audio_only_works() {
        let s = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 109\r\na=rtpmap:109 opus/48000/2\r\n";
        let a = check(parse(s).unwrap(), false).unwrap();
        assert!(a.video.is_none());
        assert_eq!(a.audio.unwrap().direction, "sendrecv");
    }

    #[test]
    fn too_many_lines_is_malformed() {
        let long = format!("{CHROME}{}", "a=x-filler\r\n".repeat(MAX_LINES));
        let e = parse(&long).unwrap_err();
        assert!(e.to_string().contains("lines"), "{e}");
    }

    #[test]
    fn garbage_is_malformed() {
        assert!(parse("hello").is_err());
        assert!(parse("v=0\r\nm=audio 9 X 1\r\na=rtpmap:abc opus/48000\r\n").is_err());
        assert!(parse("v=0\r\nm=\r\n").is_err());
    }

    #[test]
    fn simulcast_layers_in_the_offers_order() {
        let offer = "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=rid:h send\r\n\
                     a=rid:m send\r\na=rid:l send\r\na=simulcast:send h;~m,x;l\r\n";
        assert_eq!(simulcast_rids(offer), ["h", "m", "l"]);
        let both = "a=simulcast:recv q send 2;1;0\r\n";
        assert_eq!(simulcast_rids(both), ["2", "1", "0"]);
        assert!(simulcast_rids("v=0\r\na=simulcast:\r\na=simulcast:send\r\n").is_empty());
    }
}
