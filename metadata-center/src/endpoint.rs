//! Engine / cache-location identity.
//!
//! The origin identifies an engine by its IPv4 address only (ports dropped, IPv6 and host names
//! rejected). We accept an IPv4 or IPv6 address, optionally with a port (`10.0.0.1:8000`,
//! `[fd00::1]:8000`), and keep the port so that two engines on one host stay distinct.
//! The canonical text form (RFC 5952 for IPv6) is what the server returns.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct Endpoint {
    pub ip: IpAddr,
    /// `None` when the client sent a bare address (the origin's wire form).
    pub port: Option<u16>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct BadEndpoint;

impl FromStr for Endpoint {
    type Err = BadEndpoint;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Err(BadEndpoint);
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Endpoint { ip, port: None });
        }
        // `[v6]` without a port.
        if let Some(inner) = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            if let Ok(ip) = inner.parse::<std::net::Ipv6Addr>() {
                return Ok(Endpoint {
                    ip: IpAddr::V6(ip),
                    port: None,
                });
            }
        }
        match s.parse::<SocketAddr>() {
            Ok(sa) => Ok(Endpoint {
                ip: sa.ip(),
                port: Some(sa.port()),
            }),
            Err(_) => Err(BadEndpoint),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            None => write!(f, "{}", self.ip),
            Some(p) => write!(f, "{}", SocketAddr::new(self.ip, p)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(s: &str) -> Option<String> {
        s.parse::<Endpoint>().ok().map(|e| e.to_string())
    }

    #[test]
    fn accepts_origin_and_extended_forms() {
        assert_eq!(canon("10.0.0.1").as_deref(), Some("10.0.0.1"));
        assert_eq!(canon(" 10.0.0.1 ").as_deref(), Some("10.0.0.1"));
        assert_eq!(canon("10.0.0.1:8000").as_deref(), Some("10.0.0.1:8000"));
        assert_eq!(canon("fd00:0::0001").as_deref(), Some("fd00::1"));
        assert_eq!(canon("[fd00::1]").as_deref(), Some("fd00::1"));
        assert_eq!(canon("[fd00::1]:8000").as_deref(), Some("[fd00::1]:8000"));
    }

    #[test]
    fn rejects_names_and_garbage() {
        for bad in [
            "",
            "localhost",
            "host:80",
            "10.0.0.256",
            "10.0.0.1:99999",
            "fd00::1:80x",
            "1.2.3",
        ] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn port_keeps_engines_distinct() {
        let a: Endpoint = "127.0.0.1:8001".parse().unwrap();
        let b: Endpoint = "127.0.0.1:8002".parse().unwrap();
        let c: Endpoint = "127.0.0.1".parse().unwrap();
        assert_ne!(a, b);
        assert_ne!(a, c);
    }
}
