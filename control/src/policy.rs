//! Authorization decisions for connect-udp asks (sans-IO).
//!
//! [`Policy::decide`] answers immediately when it can (bad credentials, IP
//! literal targets) and otherwise asks the caller to resolve a name, after
//! which [`Policy::after_resolution`] finishes the decision. Denials carry
//! the status and Proxy-Status error the dataplane sends:
//!
//! | case | status | Proxy-Status |
//! |---|---|---|
//! | no credentials / wrong credentials | 407 | http_request_denied |
//! | target address or port denied | 403 | destination_ip_prohibited |
//! | name does not resolve | 502 | dns_error |
//! | resolution timed out | 504 | dns_timeout |
//! | resolver overloaded | 503 | proxy_internal_error |
#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr};

use relay_proto::channel::record::{AuthAsk, Verdict};
use relay_proto::proxy_status::ProxyError;
use relay_proto::target::TargetHost;

use crate::acl::{Denial, TargetAcl};
use crate::auth::{AuthResult, BearerTokens};

/// What to do with an ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Answer now.
    Answer(Verdict),
    /// Resolve this name, then call [`Policy::after_resolution`].
    Resolve {
        /// DNS name.
        name: String,
        /// Target port.
        port: u16,
    },
}

/// Why resolution produced no addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolveFailure {
    /// The name does not exist or has no addresses.
    NotFound(String),
    /// The resolver did not answer in time.
    Timeout,
    /// Too many resolutions are pending.
    Busy,
}

/// The authorization policy.
#[derive(Debug, Clone)]
pub struct Policy {
    tokens: BearerTokens,
    acl: TargetAcl,
    idle_timeout_ms: u32,
    next_flow_id: u64,
}

fn deny(status: u16, proxy_error: ProxyError, details: &str) -> Verdict {
    Verdict::Deny { status, proxy_error: Some(proxy_error), details: details.to_string() }
}

impl Policy {
    /// A policy with these tokens, target ACL and flow idle timeout.
    pub fn new(tokens: BearerTokens, acl: TargetAcl, idle_timeout_ms: u32) -> Self {
        // Flow IDs carry a per-start epoch in the top bits, so flows that a
        // dataplane kept across a control restart never collide with new
        // ones.
        let mut epoch = [0u8; 3];
        let _ = boring::rand::rand_bytes(&mut epoch);
        let epoch = u64::from(u32::from_le_bytes([epoch[0], epoch[1], epoch[2], 0]));
        Self { tokens, acl, idle_timeout_ms, next_flow_id: (epoch << 40) | 1 }
    }

    /// First step of a decision.
    pub fn decide(&mut self, ask: &AuthAsk) -> Decision {
        match self.tokens.check(ask.authorization.as_deref()) {
            AuthResult::Accepted => {}
            AuthResult::Missing => {
                return Decision::Answer(deny(407, ProxyError::HttpRequestDenied, "authentication required"));
            }
            AuthResult::Invalid => {
                return Decision::Answer(deny(407, ProxyError::HttpRequestDenied, "invalid credentials"));
            }
        }
        // The dataplane validated the host already; re-validate anyway, as
        // nothing read from the channel is trusted.
        match TargetHost::parse(&ask.target_host) {
            Ok(TargetHost::Ip(ip)) => Decision::Answer(self.check_addresses(&[ip], ask.target_port)),
            Ok(TargetHost::Name(name)) => Decision::Resolve { name, port: ask.target_port },
            Err(_) => Decision::Answer(deny(400, ProxyError::HttpRequestError, "invalid target")),
        }
    }

    /// Finishes a decision after resolution.
    pub fn after_resolution(&mut self, port: u16, result: Result<Vec<IpAddr>, ResolveFailure>) -> Verdict {
        match result {
            Ok(addrs) if !addrs.is_empty() => self.check_addresses(&addrs, port),
            Ok(_) => deny(502, ProxyError::DnsError, "no addresses"),
            Err(ResolveFailure::NotFound(why)) => deny(502, ProxyError::DnsError, &why),
            Err(ResolveFailure::Timeout) => deny(504, ProxyError::DnsTimeout, "resolution timed out"),
            Err(ResolveFailure::Busy) => deny(503, ProxyError::ProxyInternalError, "resolver overloaded"),
        }
    }

    /// Picks the first allowed address.
    fn check_addresses(&mut self, addrs: &[IpAddr], port: u16) -> Verdict {
        let mut port_denied = false;
        for ip in addrs {
            match self.acl.check(*ip, port) {
                Ok(()) => {
                    let flow_id = self.next_flow_id;
                    self.next_flow_id += 1;
                    return Verdict::Allow {
                        flow_id,
                        target: SocketAddr::new(*ip, port),
                        idle_timeout_ms: self.idle_timeout_ms,
                        byte_budget: 0,
                    };
                }
                Err(Denial::Port) => port_denied = true,
                Err(Denial::Address) => {}
            }
        }
        if port_denied {
            deny(403, ProxyError::DestinationIpProhibited, "target port not allowed")
        } else {
            deny(403, ProxyError::DestinationIpProhibited, "target address not allowed")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(host: &str, auth: Option<&str>) -> AuthAsk {
        AuthAsk {
            ask_id: 1,
            client: "127.0.0.1:1".parse().unwrap(),
            authority: "relay".into(),
            path: "/".into(),
            target_host: host.into(),
            target_port: 53,
            authorization: auth.map(str::to_string),
        }
    }

    fn policy() -> Policy {
        Policy::new(
            BearerTokens::new(["t".to_string()]),
            TargetAcl::new(vec!["127.0.0.0/8".parse().unwrap()], vec![], vec![]),
            5000,
        )
    }

    fn status(d: &Decision) -> u16 {
        match d {
            Decision::Answer(Verdict::Deny { status, .. }) => *status,
            other => panic!("not a denial: {other:?}"),
        }
    }

    #[test]
    fn decisions() {
        let mut p = policy();
        assert_eq!(status(&p.decide(&ask("127.0.0.1", None))), 407);
        assert_eq!(status(&p.decide(&ask("127.0.0.1", Some("Bearer x")))), 407);
        assert_eq!(status(&p.decide(&ask("10.0.0.1", Some("Bearer t")))), 403);
        match p.decide(&ask("127.0.0.1", Some("Bearer t"))) {
            Decision::Answer(Verdict::Allow { flow_id, target, idle_timeout_ms: 5000, .. }) => {
                assert_eq!(flow_id & ((1 << 40) - 1), 1, "first flow of this control start");
                assert_eq!(target, "127.0.0.1:53".parse().unwrap())
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            p.decide(&ask("example.com", Some("Bearer t"))),
            Decision::Resolve { name: "example.com".into(), port: 53 }
        );
        assert_eq!(status(&p.decide(&ask("bad host", Some("Bearer t")))), 400);
    }

    #[test]
    fn resolution_outcomes() {
        let mut p = policy();
        let v = p.after_resolution(53, Ok(vec!["10.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap()]));
        assert!(matches!(v, Verdict::Allow { target, .. } if target.ip().to_string() == "127.0.0.2"));
        let v = p.after_resolution(53, Ok(vec!["10.0.0.1".parse().unwrap()]));
        assert!(matches!(
            v,
            Verdict::Deny { status: 403, proxy_error: Some(ProxyError::DestinationIpProhibited), .. }
        ));
        let v = p.after_resolution(53, Err(ResolveFailure::NotFound("NXDOMAIN".into())));
        assert!(matches!(v, Verdict::Deny { status: 502, proxy_error: Some(ProxyError::DnsError), .. }));
        let v = p.after_resolution(53, Err(ResolveFailure::Timeout));
        assert!(matches!(v, Verdict::Deny { status: 504, proxy_error: Some(ProxyError::DnsTimeout), .. }));
        let v = p.after_resolution(53, Err(ResolveFailure::Busy));
        assert!(matches!(v, Verdict::Deny { status: 503, .. }));
    }
}
