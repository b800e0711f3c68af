//! WHIP signalling over HTTP (RFC 9725): the offer's POST, the session's DELETE, the
//! PATCH of an ICE restart, and the server's candidates in its answer.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use str0m::Rtc;
use str0m::change::{SdpAnswer, SdpPendingOffer};
use tracing::{debug, info, warn};
use url::Url;

use super::load::{Failure, FailureKind};

pub(super) struct WhipSession {
    pub(super) location: Url,
    pub(super) answer: String,
}

const MAX_ERROR_BODY: usize = 2000;

pub(super) async fn post_offer(
    http: &reqwest::Client,
    url: &Url,
    token: Option<&str>,
    offer: String,
) -> anyhow::Result<WhipSession> {
    let mut req = http
        .post(url.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/sdp")
        .header(reqwest::header::ACCEPT, "application/sdp")
        .body(offer);
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    let resp = req
        .send()
        .await
        .with_context(|| format!("POST {url} failed"))?;
    let status = resp.status();
    // Relative Locations resolve against the URL that answered (after any 307).
    let base = resp.url().clone();
    let location = resp
        .headers()
        .get(reqwest::header::LOCATION)
        .map(|v| v.to_str().map(str::to_owned));
    let content_type = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = resp
        .text()
        .await
        .with_context(|| format!("reading the answer to POST {url}"))?;
    if status != reqwest::StatusCode::CREATED {
        return Err(Failure::err(
            FailureKind::HttpStatus(status.as_u16()),
            format!(
                "WHIP server refused the offer: POST {url} returned {status}{}",
                error_body(&body)
            ),
        ));
    }
    let location = match location {
        Some(Ok(l)) => base
            .join(&l)
            .with_context(|| format!("bad Location header {l:?}"))?,
        Some(Err(_)) => bail!("WHIP server sent a Location header that is not text"),
        None => bail!("WHIP server answered 201 without a Location header"),
    };
    if !content_type
        .as_deref()
        .is_some_and(|c| c.to_ascii_lowercase().starts_with("application/sdp"))
    {
        warn!("WHIP answer has Content-Type {content_type:?}, expected application/sdp");
    }
    debug!("SDP answer:\n{body}");
    Ok(WhipSession {
        location,
        answer: body,
    })
}

fn error_body(body: &str) -> String {
    let body = body.trim();
    if body.is_empty() {
        return String::new();
    }
    let mut end = body.len().min(MAX_ERROR_BODY);
    while !body.is_char_boundary(end) {
        end -= 1;
    }
    let more = if end < body.len() { " ..." } else { "" };
    format!(": {}{more}", &body[..end])
}

pub(super) async fn delete_session(
    http: &reqwest::Client,
    location: &Url,
    token: Option<&str>,
    verbose: bool,
) {
    let mut req = http
        .delete(location.clone())
        .timeout(Duration::from_secs(5));
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    match req.send().await {
        Ok(resp) if resp.status().is_success() => note!(verbose, "WHIP session deleted"),
        Ok(resp) => {
            let status = resp.status();
            let body = resp.text().await.unwrap_or_default();
            warn!("DELETE {location} returned {status}{}", error_body(&body));
        }
        Err(e) => warn!("DELETE {location} failed: {e}"),
    }
}

/// What a session needs to talk to the WHIP server after the POST.
pub(super) struct Signalling<'a> {
    pub(super) http: &'a reqwest::Client,
    pub(super) location: Url,
    pub(super) token: Option<&'a str>,
    /// The server's SDP answer, with the ICE credentials now in use.
    pub(super) answer: String,
    /// The server's addresses, to choose local candidates towards.
    pub(super) remote_ips: Vec<IpAddr>,
}

impl Signalling<'_> {
    /// Sends an ICE restart `PATCH` and returns the server's fragment.
    pub(super) async fn restart(
        &self,
        fragment: &str,
    ) -> anyhow::Result<crate::rtc::trickle::Fragment> {
        let mut req = self
            .http
            .patch(self.location.clone())
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/trickle-ice-sdpfrag",
            )
            .header(reqwest::header::IF_MATCH, "*")
            .timeout(Duration::from_secs(5))
            .body(fragment.to_owned());
        if let Some(token) = self.token {
            req = req.bearer_auth(token);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("ICE restart PATCH {} failed", self.location))?;
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        if status != reqwest::StatusCode::OK {
            bail!(
                "WHIP server refused the ICE restart: PATCH {} returned {status}{}",
                self.location,
                error_body(&body)
            );
        }
        crate::rtc::trickle::parse(&body)
            .map_err(|e| anyhow!("WHIP server's ICE restart answer is malformed: {e}"))
    }
}

/// The client's ICE restart fragment (RFC 9725 §4.3.2): the ICE lines of the restart offer
/// (new ufrag/pwd per media section) with our new `candidates` in the first section.
pub(super) fn restart_fragment(offer: &str, candidates: &[String]) -> String {
    let ice = crate::rtc::trickle::ice_fragment(offer);
    let mut out = String::new();
    let mut sections = 0;
    for line in ice.lines() {
        if line.starts_with("a=candidate:") || line == "a=end-of-candidates" {
            continue; // the offer's candidates are the old ones
        }
        if line.starts_with("m=") {
            sections += 1;
        }
        out.push_str(line);
        out.push_str("\r\n");
        if sections == 1 && line.starts_with("a=ice-pwd:") {
            for c in candidates {
                out.push_str("a=");
                out.push_str(c);
                out.push_str("\r\n");
            }
            out.push_str("a=end-of-candidates\r\n");
        }
    }
    out
}

pub(super) fn accept_answer(
    rtc: &mut Rtc,
    pending: SdpPendingOffer,
    answer: &str,
) -> anyhow::Result<()> {
    let answer = SdpAnswer::from_sdp_string(answer)
        .map_err(|e| anyhow!("WHIP server sent an SDP answer we cannot parse: {e}"))?;
    rtc.sdp_api()
        .accept_answer(pending, answer)
        .map_err(|e| anyhow!("cannot use the WHIP server's SDP answer: {e}"))
}

/// The IP addresses of the UDP and TCP candidates in an SDP (mDNS names are skipped).
pub(super) fn remote_candidate_ips(sdp: &str) -> Vec<IpAddr> {
    let mut ips = Vec::new();
    for line in sdp.lines() {
        let Some(rest) = line.trim().strip_prefix("a=candidate:") else {
            continue;
        };
        // foundation component transport priority address port typ type ...
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let (Some(transport), Some(addr)) = (fields.get(2), fields.get(4)) else {
            continue;
        };
        if !(transport.eq_ignore_ascii_case("udp") || transport.eq_ignore_ascii_case("tcp")) {
            continue;
        }
        match addr.parse::<IpAddr>() {
            Ok(ip) if !ips.contains(&ip) => ips.push(ip),
            _ => {}
        }
    }
    ips
}

pub(super) async fn resolve_host(url: &Url) -> anyhow::Result<Vec<IpAddr>> {
    let port = url.port_or_known_default().unwrap_or(80);
    let ips = match url.host() {
        Some(url::Host::Ipv4(ip)) => vec![IpAddr::V4(ip)],
        Some(url::Host::Ipv6(ip)) => vec![IpAddr::V6(ip)],
        Some(url::Host::Domain(name)) => tokio::net::lookup_host((name, port))
            .await
            .with_context(|| format!("cannot resolve {name}"))?
            .map(|a| a.ip())
            .collect(),
        None => bail!("WHIP URL {url} has no host"),
    };
    Ok(ips)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidate_lines() {
        let sdp = "v=0\r\na=candidate:1 1 UDP 2130706431 192.0.2.7 5000 typ host\r\n\
                   a=candidate:2 1 tcp 1 192.0.2.8 9 typ host tcptype passive\r\n\
                   a=candidate:3 1 udp 1 abc.local 5000 typ host\r\n\
                   a=candidate:4 1 udp 1 192.0.2.7 5002 typ host\r\n";
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // UDP and TCP addresses, once each; mDNS names skipped.
        assert_eq!(
            remote_candidate_ips(sdp),
            vec![ip("192.0.2.7"), ip("192.0.2.8")]
        );
    }
}
