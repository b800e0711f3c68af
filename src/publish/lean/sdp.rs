//! The lean sender's SDP: a send-only offer (JSEP-style, BUNDLE, rtcp-mux, one payload type per
//! media) and what it needs from the answer.

use std::fmt::Write as _;

/// The header extension that names a packet's media section (RFC 8843 §15.2).
pub(super) const MID_EXT_URI: &str = "urn:ietf:params:rtp-hdrext:sdes:mid";
/// The id the offer gives that extension.
const MID_EXT_ID: u8 = 4;
/// The transport-wide sequence number extension, for the server's congestion control
/// feedback (TWCC), as browsers send it.
pub(super) const TWCC_EXT_URI: &str =
    "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01";
const TWCC_EXT_ID: u8 = 3;
pub(super) const H264_PT: u8 = 102;
pub(super) const OPUS_PT: u8 = 111;

/// One media section of the offer.
pub(super) struct OfferMedia {
    pub(super) mid: &'static str,
    pub(super) ssrc: u32,
    /// H264 video with this `profile-level-id` (`None`: Opus audio).
    pub(super) h264_profile: Option<u32>,
}

/// What goes into the offer.
pub(super) struct Offer<'a> {
    pub(super) ufrag: &'a str,
    pub(super) pwd: &'a str,
    /// SHA-256 of the DTLS certificate, `AB:CD:...`.
    pub(super) fingerprint: &'a str,
    /// Host candidates, `candidate:...` (what goes after `a=`).
    pub(super) candidates: &'a [String],
    pub(super) cname: &'a str,
    pub(super) media: &'a [OfferMedia],
}

impl Offer<'_> {
    pub(super) fn to_sdp(&self) -> String {
        let mids: Vec<&str> = self.media.iter().map(|m| m.mid).collect();
        let mut s = format!(
            "v=0\r\no=- {} 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE {}\r\n\
             a=msid-semantic: WMS\r\n",
            rand::random::<u32>(),
            mids.join(" ")
        );
        for m in self.media {
            let (kind, pt) = match m.h264_profile {
                Some(_) => ("video", H264_PT),
                None => ("audio", OPUS_PT),
            };
            let _ = write!(
                s,
                "m={kind} 9 UDP/TLS/RTP/SAVPF {pt}\r\nc=IN IP4 0.0.0.0\r\n\
                 a=rtcp:9 IN IP4 0.0.0.0\r\na=ice-ufrag:{}\r\na=ice-pwd:{}\r\n\
                 a=fingerprint:sha-256 {}\r\na=setup:actpass\r\na=mid:{}\r\n\
                 a=extmap:{MID_EXT_ID} {MID_EXT_URI}\r\na=extmap:{TWCC_EXT_ID} {TWCC_EXT_URI}\r\n\
                 a=sendonly\r\na=msid:- {kind}\r\n\
                 a=rtcp-mux\r\n",
                self.ufrag, self.pwd, self.fingerprint, m.mid
            );
            match m.h264_profile {
                Some(profile) => {
                    let _ = write!(
                        s,
                        "a=rtpmap:{pt} H264/90000\r\na=rtcp-fb:{pt} transport-cc\r\n\
                         a=rtcp-fb:{pt} nack\r\n\
                         a=rtcp-fb:{pt} nack pli\r\na=fmtp:{pt} level-asymmetry-allowed=1;\
                         packetization-mode=1;profile-level-id={profile:06x}\r\n"
                    );
                }
                None => {
                    let _ = write!(
                        s,
                        "a=rtpmap:{pt} opus/48000/2\r\na=rtcp-fb:{pt} transport-cc\r\n\
                         a=fmtp:{pt} minptime=10;useinbandfec=1\r\n"
                    );
                }
            }
            let _ = write!(s, "a=ssrc:{} cname:{}\r\n", m.ssrc, self.cname);
            for c in self.candidates {
                let _ = write!(s, "a={c}\r\n");
            }
            s.push_str("a=end-of-candidates\r\n");
        }
        s
    }
}

/// One media section of the answer.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct AnswerMedia {
    pub(super) mid: String,
    /// False when the port is 0 or the direction is `inactive`: nothing goes out for it.
    pub(super) accepted: bool,
    /// The payload types the answer kept, in its order.
    pub(super) pts: Vec<u8>,
    /// The id of the `mid` header extension, if the answer kept it.
    pub(super) mid_ext: Option<u8>,
    /// The id of the transport-wide sequence number extension, if the answer kept it.
    pub(super) twcc_ext: Option<u8>,
}

/// What the sender needs from the answer.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Answer {
    pub(super) ufrag: String,
    pub(super) pwd: String,
    /// `sha-256` fingerprint bytes.
    pub(super) fingerprint: Vec<u8>,
    /// The answerer takes the DTLS client role (`a=setup:active`, RFC 5763).
    pub(super) answerer_active: bool,
    /// `candidate:...` attributes.
    pub(super) candidates: Vec<String>,
    pub(super) media: Vec<AnswerMedia>,
}

/// Why an answer cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(super) enum AnswerError {
    #[error("the SDP answer has no {0}")]
    Missing(&'static str),
    #[error("the SDP answer's fingerprint is not sha-256 hex: {0:?}")]
    Fingerprint(String),
    #[error("the SDP answer's ICE attributes: {0}")]
    Ice(String),
}

impl Answer {
    /// ICE credentials and candidates are read as the server reads a trickle fragment
    /// (`rtc::trickle`: candidates it cannot use, TCP or mDNS, are dropped); the rest here.
    pub(super) fn parse(sdp: &str) -> Result<Self, AnswerError> {
        let ice = crate::rtc::trickle::parse(sdp).map_err(AnswerError::Ice)?;
        let mut a = Answer {
            ufrag: ice.ufrag.unwrap_or_default(),
            pwd: ice.pwd.unwrap_or_default(),
            candidates: ice.candidates,
            ..Answer::default()
        };
        let mut setup = None;
        for line in sdp.lines().map(str::trim_end) {
            if let Some(m) = line.strip_prefix("m=") {
                let port = m.split_whitespace().nth(1);
                let accepted = port.is_some_and(|p| p != "0");
                let pts = m
                    .split_whitespace()
                    .skip(3)
                    .filter_map(|p| p.parse().ok())
                    .collect();
                a.media.push(AnswerMedia {
                    accepted,
                    pts,
                    ..AnswerMedia::default()
                });
                continue;
            }
            let Some(attr) = line.strip_prefix("a=") else {
                continue;
            };
            let (name, value) = attr.split_once(':').unwrap_or((attr, ""));
            match name {
                "setup" if setup.is_none() => setup = Some(value.to_owned()),
                "fingerprint" if a.fingerprint.is_empty() => {
                    let (hash, hex) = value.split_once(' ').unwrap_or(("", ""));
                    if !hash.eq_ignore_ascii_case("sha-256") {
                        continue;
                    }
                    a.fingerprint = hex
                        .split(':')
                        .map(|b| u8::from_str_radix(b, 16))
                        .collect::<Result<_, _>>()
                        .ok()
                        .filter(|f: &Vec<u8>| f.len() == 32)
                        .ok_or_else(|| AnswerError::Fingerprint(hex.to_owned()))?;
                }
                _ => {}
            }
            let Some(media) = a.media.last_mut() else {
                continue;
            };
            match name {
                "mid" => media.mid = value.to_owned(),
                "inactive" => media.accepted = false,
                "extmap" => {
                    let mut parts = value.split_whitespace();
                    let id = parts
                        .next()
                        .and_then(|id| id.split('/').next()?.parse().ok());
                    match parts.next() {
                        Some(MID_EXT_URI) => media.mid_ext = id,
                        Some(TWCC_EXT_URI) => media.twcc_ext = id,
                        _ => {}
                    }
                }
                _ => {}
            }
        }
        if a.ufrag.is_empty() || a.pwd.is_empty() {
            return Err(AnswerError::Missing("ice-ufrag/ice-pwd"));
        }
        if a.fingerprint.is_empty() {
            return Err(AnswerError::Missing("sha-256 fingerprint"));
        }
        a.answerer_active = setup.as_deref() == Some("active");
        Ok(a)
    }

    /// The answer's section for `mid`, if it accepted it with payload type `pt`.
    pub(super) fn accepted(&self, mid: &str, pt: u8) -> Option<&AnswerMedia> {
        self.media
            .iter()
            .find(|m| m.mid == mid)
            .filter(|m| m.accepted && m.pts.contains(&pt))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offer_has_what_a_whip_server_needs() {
        let media = [
            OfferMedia {
                mid: "0",
                ssrc: 11,
                h264_profile: Some(0x42e01f),
            },
            OfferMedia {
                mid: "1",
                ssrc: 22,
                h264_profile: None,
            },
        ];
        let offer = Offer {
            ufrag: "uf",
            pwd: "pw",
            fingerprint: "AB:CD",
            candidates: &["candidate:1 1 udp 2130706431 127.0.0.1 5000 typ host".to_owned()],
            cname: "c",
            media: &media,
        }
        .to_sdp();
        for want in [
            "a=group:BUNDLE 0 1\r\n",
            "m=video 9 UDP/TLS/RTP/SAVPF 102\r\n",
            "a=fmtp:102 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f\r\n",
            "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\n",
            "a=rtpmap:111 opus/48000/2\r\n",
            "a=ssrc:22 cname:c\r\n",
            "a=fingerprint:sha-256 AB:CD\r\n",
            "a=setup:actpass\r\n",
            "a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid\r\n",
            "a=extmap:3 http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01\r\n",
            "a=rtcp-fb:102 transport-cc\r\n",
            "a=candidate:1 1 udp 2130706431 127.0.0.1 5000 typ host\r\n",
        ] {
            assert!(offer.contains(want), "{want:?} missing in\n{offer}");
        }
    }

    #[test]
    fn answer_fields() {
        let fp = (0..32)
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(":");
        let sdp = format!(
            "v=0\r\na=ice-lite\r\na=group:BUNDLE 0 1\r\nm=video 9 UDP/TLS/RTP/SAVPF 102\r\n\
             a=ice-ufrag:su\r\na=ice-pwd:sp0123456789abcdefghij\r\na=fingerprint:sha-256 {fp}\r\na=setup:passive\r\n\
             a=mid:0\r\na=extmap:7 urn:ietf:params:rtp-hdrext:sdes:mid\r\n\
             a=extmap:5 {TWCC_EXT_URI}\r\na=recvonly\r\n\
             a=candidate:1 1 udp 1 127.0.0.1 8189 typ host\r\n\
             a=candidate:2 1 tcp 1 127.0.0.1 8189 typ host tcptype passive\r\n\
             m=audio 0 UDP/TLS/RTP/SAVPF 111\r\na=mid:1\r\n"
        );
        let a = Answer::parse(&sdp).unwrap();
        assert_eq!(
            (a.ufrag.as_str(), a.pwd.as_str()),
            ("su", "sp0123456789abcdefghij")
        );
        assert_eq!(a.fingerprint, (0..32).collect::<Vec<u8>>());
        assert!(!a.answerer_active);
        assert_eq!(
            a.candidates,
            ["candidate:1 1 udp 1 127.0.0.1 8189 typ host ufrag su"],
            "the UDP candidate, with its ufrag; the TCP one is dropped"
        );
        let video = a.accepted("0", 102).unwrap();
        assert_eq!((video.mid_ext, video.twcc_ext), (Some(7), Some(5)));
        assert!(a.accepted("0", 96).is_none(), "payload type not kept");
        assert!(a.accepted("1", 111).is_none(), "port 0 rejects");
    }

    #[test]
    fn bad_answers_are_errors() {
        assert_eq!(
            Answer::parse("v=0\r\nm=video 9 X 1\r\n"),
            Err(AnswerError::Missing("ice-ufrag/ice-pwd"))
        );
        let no_fp = "a=ice-ufrag:u\r\na=ice-pwd:p0123456789abcdefghijk\r\n";
        assert_eq!(
            Answer::parse(no_fp),
            Err(AnswerError::Missing("sha-256 fingerprint"))
        );
        let bad = format!("{no_fp}a=fingerprint:sha-256 ZZ:01\r\n");
        assert!(matches!(
            Answer::parse(&bad),
            Err(AnswerError::Fingerprint(_))
        ));
    }
}
