//! Sans-IO parser of trickle ICE SDP fragments (RFC 8840,
//! `application/trickle-ice-sdpfrag`) as WHIP clients PATCH them
//! (RFC 9725 §4.3.1).
//!
//! Candidates this server cannot use are dropped silently, as RFC 9725
//! asks: another transport than UDP (ICE-TCP), an address that is not an
//! IP (mDNS `.local` names, FQDNs: we do not resolve them), an RTCP
//! component (we are rtcp-mux-only), a candidate type we do not know.
//! Anything that is not a fragment at all is an error (400).

/// What a fragment brings.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Fragment {
    /// The usable candidates, each as a canonical `candidate:…` attribute
    /// value (no `a=`), carrying the ufrag of its fragment when known.
    pub candidates: Vec<String>,
    /// Candidates dropped as unsupported or unresolvable.
    pub dropped: usize,
    /// `a=end-of-candidates` was present.
    pub end_of_candidates: bool,
    /// The first `a=ice-ufrag` of the fragment.
    pub ufrag: Option<String>,
    /// The first `a=ice-pwd` of the fragment (an ICE restart brings one).
    pub pwd: Option<String>,
}

/// Parses a whole fragment body.
pub fn parse(text: &str) -> Result<Fragment, String> {
    let mut fragment = Fragment::default();
    let mut ufrag: Option<String> = None;
    let mut pending: Vec<Parsed> = Vec::new();
    let mut any_line = false;
    for (n, raw) in text.split('\n').enumerate() {
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        if line.trim().is_empty() {
            continue;
        }
        any_line = true;
        let b = line.as_bytes();
        if b.len() < 2 || !b[0].is_ascii_lowercase() || b[1] != b'=' {
            return Err(format!("line {}: not an SDP line: {line:?}", n + 1));
        }
        if b[0] == b'm' {
            // A new media section: a ufrag given there applies to it.
            continue;
        }
        if b[0] != b'a' {
            continue;
        }
        let attr = &line[2..];
        if let Some(v) = attr.strip_prefix("ice-ufrag:") {
            let v = v.trim();
            if v.is_empty() || !v.bytes().all(is_ice_char) {
                return Err(format!("line {}: bad ice-ufrag", n + 1));
            }
            ufrag = Some(v.to_owned());
            fragment.ufrag.get_or_insert_with(|| v.to_owned());
        } else if let Some(v) = attr.strip_prefix("ice-pwd:") {
            let v = v.trim();
            // RFC 8839 §5.4: 22 to 256 ice-chars.
            if !(22..=256).contains(&v.len()) || !v.bytes().all(is_ice_char) {
                return Err(format!("line {}: bad ice-pwd", n + 1));
            }
            fragment.pwd.get_or_insert_with(|| v.to_owned());
        } else if attr.starts_with("candidate:") {
            match candidate(attr).map_err(|e| format!("line {}: {e}", n + 1))? {
                Some(c) => pending.push(Parsed {
                    candidate: c,
                    ufrag: ufrag.clone(),
                }),
                None => fragment.dropped += 1,
            }
        } else if attr.trim() == "end-of-candidates" {
            fragment.end_of_candidates = true;
        }
        // Other attributes (ice-options, mid, group…) change nothing for
        // a trickle PATCH.
    }
    if !any_line {
        return Err("the fragment is empty".into());
    }
    // A session-level ufrag after the candidates still applies to them.
    let fallback = fragment.ufrag.clone();
    for p in pending {
        let mut c = p.candidate;
        if c.ufrag.is_none() {
            c.ufrag = p.ufrag.or_else(|| fallback.clone());
        }
        fragment.candidates.push(c.to_attribute());
    }
    Ok(fragment)
}

/// The offer of an ICE restart (RFC 9725 §4.3.2): the session's offer with
/// the client's new credentials and without its old candidates (the new
/// ones are added afterwards, as trickled ones are).
pub fn restart_offer(offer: &str, ufrag: &str, pwd: &str) -> String {
    let mut out = String::with_capacity(offer.len());
    for line in offer.lines() {
        let line = line.trim_end_matches('\r');
        if line.starts_with("a=candidate:") || line == "a=end-of-candidates" {
            continue;
        }
        if line.starts_with("a=ice-ufrag:") {
            out.push_str("a=ice-ufrag:");
            out.push_str(ufrag);
        } else if line.starts_with("a=ice-pwd:") {
            out.push_str("a=ice-pwd:");
            out.push_str(pwd);
        } else {
            out.push_str(line);
        }
        out.push_str("\r\n");
    }
    out
}

/// The ICE lines of an SDP as an `application/trickle-ice-sdpfrag` (RFC 8840,
/// RFC 9725 §4.3.2), as both sides of an ICE restart send them (the server
/// from its answer to [`restart_offer`]): the session-level `ice-lite` and `ice-options`, the
/// BUNDLE group, and per media section its `mid`, new `ice-ufrag`/`ice-pwd`
/// and, in the first, every candidate and `end-of-candidates`.
pub fn ice_fragment(answer: &str) -> String {
    let mut session = Vec::new();
    let mut media: Vec<Vec<&str>> = Vec::new();
    for line in answer.lines().map(|l| l.trim_end_matches('\r')) {
        if line.starts_with("m=") {
            media.push(vec![line]);
            continue;
        }
        let keep = line == "a=ice-lite"
            || line.starts_with("a=ice-options:")
            || line.starts_with("a=group:BUNDLE")
            || line.starts_with("a=mid:")
            || line.starts_with("a=ice-ufrag:")
            || line.starts_with("a=ice-pwd:")
            || line.starts_with("a=candidate:")
            || line == "a=end-of-candidates";
        if !keep {
            continue;
        }
        match media.last_mut() {
            Some(m) => m.push(line),
            None => session.push(line),
        }
    }
    // Candidates belong to the first section only (one BUNDLE transport).
    let mut out = String::new();
    for line in session {
        out.push_str(line);
        out.push_str("\r\n");
    }
    for (i, section) in media.iter().enumerate() {
        for line in section {
            let candidate = line.starts_with("a=candidate:") || *line == "a=end-of-candidates";
            if i > 0 && candidate {
                continue;
            }
            out.push_str(line);
            out.push_str("\r\n");
        }
    }
    out
}

struct Parsed {
    candidate: Candidate,
    ufrag: Option<String>,
}

struct Candidate {
    foundation: String,
    priority: u32,
    addr: std::net::IpAddr,
    port: u16,
    kind: &'static str,
    related: Option<(std::net::IpAddr, u16)>,
    ufrag: Option<String>,
}

impl Candidate {
    fn to_attribute(&self) -> String {
        let mut s = format!(
            "candidate:{} 1 udp {} {} {} typ {}",
            self.foundation, self.priority, self.addr, self.port, self.kind
        );
        if let Some((ip, port)) = self.related {
            s.push_str(&format!(" raddr {ip} rport {port}"));
        }
        if let Some(u) = &self.ufrag {
            s.push_str(&format!(" ufrag {u}"));
        }
        s
    }
}

/// `ice-char` of RFC 8839: ALPHA / DIGIT / "+" / "/".
fn is_ice_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'+' || b == b'/'
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`{|}~".contains(&b))
}

/// A host name as candidates carry them (mDNS `UUID.local`, FQDN).
fn is_host_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// One `candidate:` attribute (RFC 8839 §5.1): `Ok(None)` when it is well
/// formed but of no use to us.
fn candidate(attr: &str) -> Result<Option<Candidate>, String> {
    let rest = attr.strip_prefix("candidate:").unwrap_or(attr);
    let mut it = rest.split_ascii_whitespace();
    let mut next = |what: &str| it.next().ok_or_else(|| format!("candidate without {what}"));
    let foundation = next("foundation")?;
    if foundation.len() > 32 || !foundation.bytes().all(is_ice_char) {
        return Err(format!("bad candidate foundation {foundation:?}"));
    }
    let component: u16 = next("component")?
        .parse()
        .map_err(|_| "bad candidate component id".to_owned())?;
    let transport = next("transport")?;
    if !is_token(transport) {
        return Err(format!("bad candidate transport {transport:?}"));
    }
    let priority: u32 = next("priority")?
        .parse()
        .map_err(|_| "bad candidate priority".to_owned())?;
    let address = next("address")?;
    let port: u16 = next("port")?
        .parse()
        .map_err(|_| "bad candidate port".to_owned())?;
    if next("typ")? != "typ" {
        return Err("candidate without `typ`".into());
    }
    let kind = next("type")?;
    if !is_token(kind) {
        return Err(format!("bad candidate type {kind:?}"));
    }
    let addr = match address.parse::<std::net::IpAddr>() {
        Ok(ip) => Some(ip),
        Err(_) if is_host_name(address) => None,
        Err(_) => return Err(format!("bad candidate address {address:?}")),
    };
    let mut raddr = None;
    let mut rport = None;
    let mut ufrag = None;
    // Extensions: name/value pairs.
    let rest: Vec<&str> = it.collect();
    if !rest.len().is_multiple_of(2) {
        return Err("candidate extension without a value".into());
    }
    for pair in rest.chunks(2) {
        let (name, value) = (pair[0], pair[1]);
        match name {
            "raddr" => raddr = value.parse::<std::net::IpAddr>().ok(),
            "rport" => {
                rport = Some(
                    value
                        .parse::<u16>()
                        .map_err(|_| "bad candidate rport".to_owned())?,
                )
            }
            "ufrag" if value.bytes().all(is_ice_char) => ufrag = Some(value.to_owned()),
            "ufrag" => return Err("bad candidate ufrag".into()),
            _ if is_token(name) => {}
            _ => return Err(format!("bad candidate extension {name:?}")),
        }
    }
    let kind = match kind {
        "host" => "host",
        "srflx" => "srflx",
        "prflx" => "prflx",
        "relay" => "relay",
        _ => return Ok(None),
    };
    let Some(addr) = addr else {
        return Ok(None); // mDNS or FQDN: not resolved here
    };
    if !transport.eq_ignore_ascii_case("udp") || component != 1 || port == 0 {
        return Ok(None);
    }
    Ok(Some(Candidate {
        foundation: foundation.to_owned(),
        priority,
        addr,
        port,
        kind,
        related: raddr.zip(rport),
        ufrag,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHROME: &str = "a=ice-options:trickle ice2\r\n\
a=group:BUNDLE 0 1\r\n\
m=audio 9 UDP/TLS/RTP/SAVPF 111\r\n\
a=mid:0\r\n\
a=ice-ufrag:EsAw\r\n\
a=ice-pwd:P2uYro0UCOQ4zxjKXaWCBui1\r\n\
a=candidate:1387637174 1 udp 2122260223 192.0.2.1 61764 typ host generation 0 ufrag EsAw network-id 1\r\n\
a=candidate:3471623853 1 udp 2122194687 198.51.100.2 61765 typ host generation 0 network-id 2\r\n\
a=candidate:473322822 1 tcp 1518280447 192.0.2.1 9 typ host tcptype active generation 0 ufrag EsAw network-id 1\r\n\
a=candidate:1 1 udp 2113937151 8a3c9e8e-1f2b-4d3c-9e8e-1f2b4d3c9e8e.local 54321 typ host generation 0\r\n\
a=candidate:2 1 udp 1677729535 203.0.113.9 40000 typ srflx raddr 0.0.0.0 rport 0 generation 0\r\n\
a=candidate:3 2 udp 2122260222 192.0.2.1 61765 typ host\r\n\
a=end-of-candidates\r\n";

    #[test]
    fn chrome_like_fragment() {
        let f = parse(CHROME).unwrap();
        assert_eq!(f.ufrag.as_deref(), Some("EsAw"));
        assert!(f.end_of_candidates);
        // tcp, mDNS and the RTCP component are dropped.
        assert_eq!(f.dropped, 3, "{f:?}");
        assert_eq!(
            f.candidates,
            vec![
                "candidate:1387637174 1 udp 2122260223 192.0.2.1 61764 typ host ufrag EsAw",
                "candidate:3471623853 1 udp 2122194687 198.51.100.2 61765 typ host ufrag EsAw",
                "candidate:2 1 udp 1677729535 203.0.113.9 40000 typ srflx raddr 0.0.0.0 rport 0 ufrag EsAw",
            ]
        );
    }

    #[test]
    fn restart_fragment_carries_the_new_credentials() {
        let f = parse(
            "a=ice-ufrag:NEWU\r\na=ice-pwd:aaaaaaaaaaaaaaaaaaaaaaaa\r\n\
             a=candidate:1 1 udp 2122260223 192.0.2.1 61766 typ host\r\n",
        )
        .unwrap();
        assert_eq!(f.ufrag.as_deref(), Some("NEWU"));
        assert_eq!(f.pwd.as_deref(), Some("aaaaaaaaaaaaaaaaaaaaaaaa"));
        assert!(parse("a=ice-pwd:short\r\n").is_err());
    }

    #[test]
    fn restart_offer_swaps_credentials_and_drops_old_candidates() {
        let offer = "v=0\r\na=group:BUNDLE 0 1\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n\
                     a=mid:0\r\na=ice-ufrag:old\r\na=ice-pwd:oldoldoldoldoldoldoldold\r\n\
                     a=candidate:1 1 udp 1 192.0.2.1 5000 typ host\r\na=end-of-candidates\r\n\
                     m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:1\r\na=ice-ufrag:old\r\n\
                     a=ice-pwd:oldoldoldoldoldoldoldold\r\n";
        let new = restart_offer(offer, "NEWU", "newnewnewnewnewnewnewnew");
        assert_eq!(new.matches("a=ice-ufrag:NEWU\r\n").count(), 2, "{new}");
        assert_eq!(
            new.matches("a=ice-pwd:newnewnewnewnewnewnewnew\r\n")
                .count(),
            2
        );
        assert!(!new.contains("old") && !new.contains("candidate"), "{new}");
        assert!(new.contains("a=mid:1\r\n"));
    }

    #[test]
    fn ice_fragment_golden() {
        let answer = "v=0\r\no=- 1 2 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n\
                      a=group:BUNDLE 0 1\r\na=ice-lite\r\na=ice-options:trickle\r\n\
                      m=video 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\n\
                      a=ice-ufrag:SRV2\r\na=ice-pwd:pppppppppppppppppppppp\r\n\
                      a=setup:passive\r\na=recvonly\r\n\
                      a=candidate:1 1 udp 2130706175 127.0.0.1 8189 typ host\r\n\
                      a=end-of-candidates\r\n\
                      m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:1\r\n\
                      a=ice-ufrag:SRV2\r\na=ice-pwd:pppppppppppppppppppppp\r\n\
                      a=candidate:1 1 udp 2130706175 127.0.0.1 8189 typ host\r\n";
        assert_eq!(
            ice_fragment(answer),
            "a=group:BUNDLE 0 1\r\na=ice-lite\r\na=ice-options:trickle\r\n\
             m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:0\r\na=ice-ufrag:SRV2\r\n\
             a=ice-pwd:pppppppppppppppppppppp\r\n\
             a=candidate:1 1 udp 2130706175 127.0.0.1 8189 typ host\r\n\
             a=end-of-candidates\r\n\
             m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:1\r\na=ice-ufrag:SRV2\r\n\
             a=ice-pwd:pppppppppppppppppppppp\r\n"
        );
    }

    #[test]
    fn end_of_candidates_alone() {
        let f = parse("a=end-of-candidates\n").unwrap();
        assert!(f.end_of_candidates);
        assert!(f.candidates.is_empty());
    }

    #[test]
    fn ipv6_and_session_level_ufrag_after_candidates() {
        let f =
            parse("a=candidate:9 1 UDP 100 2001:db8::1 5000 typ host\na=ice-ufrag:abcd\n").unwrap();
        assert_eq!(
            f.candidates,
            vec!["candidate:9 1 udp 100 2001:db8::1 5000 typ host ufrag abcd"]
        );
    }

    #[test]
    fn malformed_fragments_are_errors() {
        for bad in [
            "",
            "\r\n",
            "hello world",
            "a=candidate:1 1 udp notanumber 192.0.2.1 5000 typ host",
            "a=candidate:1 1 udp 100 192.0.2.1 5000 host",
            "a=candidate:1 1 udp 100 192.0.2.1 99999 typ host",
            "a=candidate:1 1 udp 100 192.0.2.1",
            "a=candidate:1 1 udp 100 bad/addr 5000 typ host",
            "a=candidate:1 1 udp 100 192.0.2.1 5000 typ host raddr",
            "a=candidate:1 1 udp 100 192.0.2.1 5000 typ host rport x",
            "a=ice-ufrag:\"\"",
            "{\"candidate\": 1}",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn unknown_types_and_transports_are_dropped() {
        let f = parse(
            "a=candidate:1 1 sctp 100 192.0.2.1 5000 typ host\n\
             a=candidate:1 1 udp 100 192.0.2.1 5000 typ weird\n\
             a=candidate:1 1 udp 100 example.com 5000 typ host\n",
        )
        .unwrap();
        assert_eq!(f.dropped, 3);
        assert!(f.candidates.is_empty());
    }
}
