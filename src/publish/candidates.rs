//! Local addresses: one socket on `0.0.0.0`, one host candidate per local IPv4 address we
//! route from.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use str0m::net::TcpType;
use str0m::{Candidate, Rtc};
use tracing::debug;

use super::driver::ACTIVE_TCP_PORT;

/// The local addresses our single `0.0.0.0:port` socket is reachable at, learnt from the
/// kernel's routing decision towards each remote address.
pub(super) struct LocalAddrs {
    port: u16,
    by_remote: HashMap<IpAddr, Option<SocketAddr>>,
    candidates: Vec<SocketAddr>,
}

impl LocalAddrs {
    pub(super) fn new(port: u16) -> Self {
        Self {
            port,
            by_remote: HashMap::new(),
            candidates: Vec::new(),
        }
    }

    /// The local address used to reach `remote`; a new one is returned only the first time it
    /// is seen (so the caller adds it as a candidate once).
    pub(super) fn route_to(&mut self, remote: IpAddr) -> Option<SocketAddr> {
        let local = *self
            .by_remote
            .entry(remote)
            .or_insert_with(|| route_local_ip(remote).map(|ip| SocketAddr::new(ip, self.port)));
        let local = local?;
        if self.candidates.contains(&local) {
            None
        } else {
            self.candidates.push(local);
            Some(local)
        }
    }

    pub(super) fn candidates(&self) -> Vec<SocketAddr> {
        self.candidates.clone()
    }

    /// Our address as seen by a datagram from `source` (the socket is bound to 0.0.0.0).
    pub(super) fn destination_for(&mut self, source: SocketAddr) -> SocketAddr {
        let ip = source.ip();
        if let Some(Some(local)) = self.by_remote.get(&ip) {
            return *local;
        }
        let local = route_local_ip(ip).map(|l| SocketAddr::new(l, self.port));
        self.by_remote.insert(ip, local);
        local
            .or_else(|| self.candidates.first().copied())
            .unwrap_or_else(|| SocketAddr::from((Ipv4Addr::LOCALHOST, self.port)))
    }
}

/// The IPv4 address the OS would send from to reach `remote` (no packet is sent).
fn route_local_ip(remote: IpAddr) -> Option<IpAddr> {
    let IpAddr::V4(v4) = remote else {
        debug!("skipping IPv6 address {remote}: publish uses IPv4 only");
        return None;
    };
    if v4.is_loopback() {
        return Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    let probe = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
    probe.connect((v4, 9)).ok()?;
    let ip = probe.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(ip)
}

/// A UDP host candidate at `addr`, or with `tcp` an active TCP one at its IP (port 9, as
/// RFC 6544 §4.5 has active candidates).
pub(super) fn add_host_candidate(rtc: &mut Rtc, addr: SocketAddr, tcp: bool) {
    let candidate = if tcp {
        Candidate::builder()
            .tcp()
            .host(SocketAddr::new(addr.ip(), ACTIVE_TCP_PORT))
            .tcptype(TcpType::Active)
            .build()
    } else {
        Candidate::host(addr, "udp")
    };
    match candidate {
        Ok(c) => {
            debug!("local host candidate {addr}");
            rtc.add_local_candidate(c);
        }
        Err(e) => debug!("skipping local address {addr}: {e}"),
    }
}
