//! RTMP push destinations: `rtmp://host[:1935]/app[/more]/key` and
//! `rtmps://host[:443]/app/key`, split into what the RTMP client needs (host,
//! port, app, stream key, tcUrl) plus a display form that never shows the
//! stream key. Sans-IO, no tokio.
//!
//! The app is the whole path up to the last `/` (`live2`, or `app/inst` for
//! servers with application instances), the key is the last segment with any
//! query string (`key?token=…`): CDNs put authentication there.
//!
//! A `#rendition=NAME` suffix (never sent: RTMP URLs have no fragment)
//! pushes that rendition of an ABR ladder instead of the preset's first.

use std::fmt;

/// Default port of `rtmp://`.
pub const RTMP_PORT: u16 = 1935;
/// Default port of `rtmps://`.
pub const RTMPS_PORT: u16 = 443;

/// Placeholder replaced by the stream name in configured URLs.
pub const STREAM_PLACEHOLDER: &str = "{stream}";

/// Why a push URL was refused. Never contains the stream key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("push URL must start with rtmp:// or rtmps://")]
    Scheme,
    #[error("push URL has no host")]
    NoHost,
    #[error("push URL has a bad port")]
    Port,
    #[error("push URL must not carry credentials before the host; put them in the stream key")]
    Credentials,
    #[error("push URL needs an application and a stream key: rtmp://host/app/key")]
    NoAppOrKey,
    #[error("push URL contains whitespace or control characters")]
    BadCharacter,
    #[error("push URL suffix must be #rendition=NAME (letters, digits, '-', '_')")]
    Rendition,
}

/// One parsed push destination.
#[derive(Clone, PartialEq, Eq)]
pub struct Target {
    /// True for `rtmps://` (TLS).
    pub tls: bool,
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    pub port: u16,
    /// Application, e.g. `live2`; may contain `/`.
    pub app: String,
    /// Stream key (secret), with its query string if any.
    pub key: String,
    /// `tcUrl` sent in `connect`: scheme, authority as written, app.
    pub tc_url: String,
    /// The ladder rendition to push (`#rendition=NAME`); `None`: the first.
    pub rendition: Option<String>,
    masked: String,
}

impl Target {
    /// Parses `rtmp://host[:port]/app[/more]/key[?query]` (or `rtmps://`).
    pub fn parse(url: &str) -> Result<Target, TargetError> {
        let url = url.trim();
        if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(TargetError::BadCharacter);
        }
        let (url, rendition) = match url.split_once('#') {
            Some((url, fragment)) => {
                let name = fragment
                    .strip_prefix("rendition=")
                    .filter(|n| crate::preset::valid_rendition_name(n))
                    .ok_or(TargetError::Rendition)?;
                (url, Some(name.to_owned()))
            }
            None => (url, None),
        };
        let (tls, rest) = if let Some(r) = strip_prefix_ci(url, "rtmps://") {
            (true, r)
        } else if let Some(r) = strip_prefix_ci(url, "rtmp://") {
            (false, r)
        } else {
            return Err(TargetError::Scheme);
        };
        let (authority, path) = rest.split_once('/').ok_or(TargetError::NoAppOrKey)?;
        if authority.contains('@') {
            return Err(TargetError::Credentials);
        }
        let default_port = if tls { RTMPS_PORT } else { RTMP_PORT };
        let (host, port) = split_host_port(authority, default_port)?;
        // The key is the last segment before any query string.
        let query_at = path.find('?').unwrap_or(path.len());
        let slash = path[..query_at].rfind('/').ok_or(TargetError::NoAppOrKey)?;
        let app = path[..slash].trim_matches('/');
        let key = &path[slash + 1..];
        if app.is_empty() || key.is_empty() || key.starts_with('?') {
            return Err(TargetError::NoAppOrKey);
        }
        let scheme = if tls { "rtmps" } else { "rtmp" };
        let tc_url = format!("{scheme}://{authority}/{app}");
        let mut masked = format!("{tc_url}/{}", mask_key(key));
        if let Some(r) = &rendition {
            masked.push_str(&format!("#rendition={r}"));
        }
        Ok(Target {
            tls,
            host,
            port,
            app: app.to_owned(),
            key: key.to_owned(),
            tc_url,
            rendition,
            masked,
        })
    }

    /// Parses a configured URL after replacing `{stream}` with `stream`.
    pub fn parse_for_stream(template: &str, stream: &str) -> Result<Target, TargetError> {
        Target::parse(&substitute_stream(template, stream))
    }

    /// The URL for logs and API listings: the stream key is masked.
    pub fn masked(&self) -> &str {
        &self.masked
    }

    /// The full URL, key included. Secret: never log it.
    pub fn url(&self) -> String {
        format!("{}/{}", self.tc_url, self.key)
    }

    /// The URL as configured: [`Target::url`] and any `#rendition=` suffix.
    /// Secret: never log it.
    pub fn configured(&self) -> String {
        match &self.rendition {
            Some(r) => format!("{}#rendition={r}", self.url()),
            None => self.url(),
        }
    }

    /// `host:port` to connect to (IPv6 in brackets).
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Never shows the key, even in `{:?}`.
impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Target").field(&self.masked).finish()
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked)
    }
}

/// Replaces every `{stream}` in `template` with `stream`.
pub fn substitute_stream(template: &str, stream: &str) -> String {
    template.replace(STREAM_PLACEHOLDER, stream)
}

/// Masks a URL for display without parsing it strictly: for config errors
/// about URLs that do not parse. Keeps scheme and authority only.
pub fn mask_unparsed(url: &str) -> String {
    match Target::parse(url) {
        Ok(t) => t.masked,
        Err(_) => {
            let Some((scheme, rest)) = url.split_once("://") else {
                return "****".to_owned();
            };
            let authority = rest.split(['/', '?']).next().unwrap_or("");
            let authority = authority.rsplit('@').next().unwrap_or("");
            format!("{scheme}://{authority}/****")
        }
    }
}

/// `****` plus the last 4 characters of the key when it is long enough
/// that those give nothing useful away (16+ characters, query excluded);
/// `****` otherwise.
fn mask_key(key: &str) -> String {
    let bare = key.split('?').next().unwrap_or("");
    let chars: Vec<char> = bare.chars().collect();
    if chars.len() >= 16 {
        let tail: String = chars[chars.len() - 4..].iter().collect();
        format!("****{tail}")
    } else {
        "****".to_owned()
    }
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

fn split_host_port(authority: &str, default_port: u16) -> Result<(String, u16), TargetError> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or(TargetError::NoHost)?;
        match after {
            "" => (host, None),
            p => (host, Some(p.strip_prefix(':').ok_or(TargetError::Port)?)),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(TargetError::NoHost);
    }
    let port = match port {
        None => default_port,
        Some(p) => match p.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => return Err(TargetError::Port),
        },
    };
    Ok((host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn youtube_style_url() {
        let t = Target::parse("rtmp://a.rtmp.youtube.com/live2/abcd-efgh-ijkl-mnop-qrst").unwrap();
        assert!(!t.tls);
        assert_eq!(t.host, "a.rtmp.youtube.com");
        assert_eq!(t.port, 1935);
        assert_eq!(t.app, "live2");
        assert_eq!(t.key, "abcd-efgh-ijkl-mnop-qrst");
        assert_eq!(t.tc_url, "rtmp://a.rtmp.youtube.com/live2");
        assert_eq!(t.masked(), "rtmp://a.rtmp.youtube.com/live2/****qrst");
        assert_eq!(
            t.url(),
            "rtmp://a.rtmp.youtube.com/live2/abcd-efgh-ijkl-mnop-qrst"
        );
        assert_eq!(t.address(), "a.rtmp.youtube.com:1935");
    }

    #[test]
    fn rtmps_default_port_nested_app_and_query() {
        let t =
            Target::parse("rtmps://live-api-s.facebook.com:443/rtmp/FB-123?s_bl=1&a=b/c").unwrap();
        assert!(t.tls);
        assert_eq!(t.port, 443);
        assert_eq!(t.app, "rtmp");
        assert_eq!(t.key, "FB-123?s_bl=1&a=b/c");
        assert_eq!(t.masked(), "rtmps://live-api-s.facebook.com:443/rtmp/****");
        let t = Target::parse("RTMPS://host/app/inst/key").unwrap();
        assert_eq!(
            (t.port, t.app.as_str(), t.key.as_str()),
            (443, "app/inst", "key")
        );
        assert_eq!(t.tc_url, "rtmps://host/app/inst");
    }

    #[test]
    fn ports_and_ipv6() {
        let t = Target::parse("rtmp://127.0.0.1:19350/live/k").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("127.0.0.1", 19350));
        assert_eq!(t.tc_url, "rtmp://127.0.0.1:19350/live");
        let t = Target::parse("rtmp://[::1]:2000/live/k").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 2000));
        assert_eq!(t.address(), "[::1]:2000");
        let t = Target::parse("rtmp://[::1]/live/k").unwrap();
        assert_eq!(t.port, 1935);
    }

    #[test]
    fn rejects_bad_urls_without_leaking_the_key() {
        for (url, err) in [
            ("http://h/app/key", TargetError::Scheme),
            ("rtmp://h/key", TargetError::NoAppOrKey),
            ("rtmp://h/app/", TargetError::NoAppOrKey),
            ("rtmp://h", TargetError::NoAppOrKey),
            ("rtmp:///app/key", TargetError::NoHost),
            ("rtmp://h:0/app/key", TargetError::Port),
            ("rtmp://h:99999/app/key", TargetError::Port),
            ("rtmp://h:x/app/key", TargetError::Port),
            ("rtmp://u:p@h/app/key", TargetError::Credentials),
            ("rtmp://h/app/ke y", TargetError::BadCharacter),
            ("rtmp://h/app/?k", TargetError::NoAppOrKey),
            ("rtmp://h/app/key#480p", TargetError::Rendition),
            ("rtmp://h/app/key#rendition=", TargetError::Rendition),
            ("rtmp://h/app/key#rendition=a/b", TargetError::Rendition),
        ] {
            assert_eq!(Target::parse(url), Err(err), "{url}");
        }
        assert!(!TargetError::NoAppOrKey.to_string().contains("key?"));
    }

    #[test]
    fn masking_never_shows_short_keys_or_queries() {
        let t = Target::parse("rtmp://h/app/short?token=secret").unwrap();
        assert_eq!(t.masked(), "rtmp://h/app/****");
        assert!(!format!("{t:?} {t}").contains("short"));
        assert_eq!(
            mask_unparsed("rtmp://user:pw@h:1/secretkey"),
            "rtmp://h:1/****"
        );
        assert_eq!(mask_unparsed("garbage-secret"), "****");
    }

    #[test]
    fn a_rendition_suffix_picks_the_rendition_and_is_not_sent() {
        let t = Target::parse("rtmp://h/app/secretkey#rendition=720p").unwrap();
        assert_eq!(t.rendition.as_deref(), Some("720p"));
        assert_eq!(t.url(), "rtmp://h/app/secretkey");
        assert_eq!(t.configured(), "rtmp://h/app/secretkey#rendition=720p");
        assert_eq!(t.masked(), "rtmp://h/app/****#rendition=720p");
        assert_eq!(Target::parse("rtmp://h/app/k").unwrap().rendition, None);
    }

    #[test]
    fn stream_substitution() {
        assert_eq!(
            substitute_stream("rtmp://h/live/{stream}?k={stream}", "cam1"),
            "rtmp://h/live/cam1?k=cam1"
        );
        let t = Target::parse_for_stream("rtmp://h/live/{stream}", "cam1").unwrap();
        assert_eq!(t.key, "cam1");
    }
}
