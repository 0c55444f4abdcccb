//! Response header sections the relay sends (sans-IO).
#![forbid(unsafe_code)]

use relay_proto::proxy_status::{self, ProxyError};

/// A header list ready for quiche.
pub type Headers = Vec<quiche::h3::Header>;

fn h(name: &str, value: &str) -> quiche::h3::Header {
    quiche::h3::Header::new(name.as_bytes(), value.as_bytes())
}

/// The 2xx that opens a connect-udp tunnel. RFC 9298 section 3.5: the
/// response carries `capsule-protocol: ?1` (RFC 9297 section 3.4).
pub fn tunnel_open() -> Headers {
    vec![h(":status", "200"), h("capsule-protocol", "?1")]
}

/// A refusal with `status`, a Proxy-Status field when `proxy_error` is set,
/// a `Proxy-Authenticate: Bearer` challenge on 407 (RFC 9110 section
/// 11.7.1), and `Allow: CONNECT` on 405 (RFC 9110 section 15.5.6).
pub fn refusal(
    status: u16,
    proxy_error: Option<ProxyError>,
    details: &str,
    proxy_name: &str,
    realm: &str,
) -> Headers {
    let mut out = vec![h(":status", &status.to_string())];
    if let Some(e) = proxy_error {
        let details = (!details.is_empty()).then_some(details);
        out.push(h("proxy-status", &proxy_status::format(proxy_name, e, details)));
    }
    if status == 407 {
        let realm: String =
            realm.chars().filter(|c| *c != '"' && *c != '\\' && (' '..='~').contains(c)).collect();
        out.push(h("proxy-authenticate", &format!("Bearer realm=\"{realm}\"")));
    }
    if status == 405 {
        out.push(h("allow", "CONNECT"));
    }
    out
}

/// `Retry-After: <seconds>` (RFC 9110 section 10.2.3), sent with 429 when a
/// rate or byte quota will admit the client again after that long (RFC 6585
/// section 4).
pub fn retry_after(secs: u32) -> quiche::h3::Header {
    h("retry-after", &secs.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use quiche::h3::NameValue;

    fn find<'a>(hs: &'a Headers, name: &str) -> Option<&'a [u8]> {
        hs.iter().find(|x| x.name() == name.as_bytes()).map(|x| x.value())
    }

    #[test]
    fn refusals_carry_the_right_fields() {
        let r = refusal(407, Some(ProxyError::HttpRequestDenied), "invalid credentials", "relay", "re\"alm");
        assert_eq!(find(&r, ":status"), Some(&b"407"[..]));
        assert_eq!(find(&r, "proxy-authenticate"), Some(&b"Bearer realm=\"realm\""[..]));
        assert_eq!(
            find(&r, "proxy-status"),
            Some(&b"relay; error=http_request_denied; details=\"invalid credentials\""[..])
        );
        let r = refusal(404, None, "", "relay", "x");
        assert_eq!(r.len(), 1);
        assert_eq!(find(&refusal(405, None, "", "relay", "x"), "allow"), Some(&b"CONNECT"[..]));
        assert_eq!(find(&tunnel_open(), "capsule-protocol"), Some(&b"?1"[..]));
        assert_eq!(retry_after(3).value(), b"3");
    }
}
