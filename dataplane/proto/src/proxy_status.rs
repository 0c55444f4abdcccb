//! The Proxy-Status response field (RFC 9209).
#![forbid(unsafe_code)]

/// Proxy error types from RFC 9209 section 2.3 that this relay reports.
///
/// The `u8` values travel in shared-memory records; they never change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ProxyError {
    /// Section 2.3.1: DNS resolution of the target timed out.
    DnsTimeout = 1,
    /// Section 2.3.2: DNS resolution failed (e.g. NXDOMAIN).
    DnsError = 2,
    /// Section 2.3.3: the target could not be determined.
    DestinationNotFound = 3,
    /// Section 2.3.4: the target is considered unavailable.
    DestinationUnavailable = 4,
    /// Section 2.3.5: the target's address is prohibited by policy.
    DestinationIpProhibited = 5,
    /// Section 2.3.6: the target's address cannot be routed.
    DestinationIpUnroutable = 6,
    /// Section 2.3.7: the target refused the connection.
    ConnectionRefused = 7,
    /// Section 2.3.9: connecting to the target timed out.
    ConnectionTimeout = 9,
    /// Section 2.3.13: the TLS handshake with the next hop failed (not a
    /// certificate problem, no alert from it).
    TlsProtocolError = 13,
    /// Section 2.3.14: the next hop's certificate did not verify (chain,
    /// validity, name).
    TlsCertificateError = 14,
    /// Section 2.3.15: the next hop sent a TLS alert.
    TlsAlertReceived = 15,
    /// Section 2.3.11: the request was denied by the proxy (auth, quota).
    HttpRequestDenied = 11,
    /// Section 2.3.12: the request was invalid.
    HttpRequestError = 12,
    /// Section 2.3.18: the next hop's response ended before it was
    /// complete.
    HttpResponseIncomplete = 18,
    /// Section 2.3.26: the next hop did not answer in time.
    HttpResponseTimeout = 26,
    /// Section 2.3.27: the HTTP Upgrade (or its equivalent) between the
    /// relay and the next hop failed.
    HttpUpgradeFailed = 27,
    /// Section 2.3.28: the next hop's response violated HTTP.
    HttpProtocolError = 28,
    /// Section 2.3.23: the proxy's configuration prevents the request.
    ProxyConfigurationError = 23,
    /// Section 2.3.24: the proxy hit an internal error (e.g. control plane
    /// unavailable).
    ProxyInternalError = 24,
}

impl ProxyError {
    /// The token used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyError::DnsTimeout => "dns_timeout",
            ProxyError::DnsError => "dns_error",
            ProxyError::DestinationNotFound => "destination_not_found",
            ProxyError::DestinationUnavailable => "destination_unavailable",
            ProxyError::DestinationIpProhibited => "destination_ip_prohibited",
            ProxyError::DestinationIpUnroutable => "destination_ip_unroutable",
            ProxyError::ConnectionRefused => "connection_refused",
            ProxyError::ConnectionTimeout => "connection_timeout",
            ProxyError::TlsProtocolError => "tls_protocol_error",
            ProxyError::TlsCertificateError => "tls_certificate_error",
            ProxyError::TlsAlertReceived => "tls_alert_received",
            ProxyError::HttpRequestDenied => "http_request_denied",
            ProxyError::HttpRequestError => "http_request_error",
            ProxyError::HttpResponseIncomplete => "http_response_incomplete",
            ProxyError::HttpResponseTimeout => "http_response_timeout",
            ProxyError::HttpUpgradeFailed => "http_upgrade_failed",
            ProxyError::HttpProtocolError => "http_protocol_error",
            ProxyError::ProxyConfigurationError => "proxy_configuration_error",
            ProxyError::ProxyInternalError => "proxy_internal_error",
        }
    }

    /// Decodes the record value; `None` for unknown codes.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => ProxyError::DnsTimeout,
            2 => ProxyError::DnsError,
            3 => ProxyError::DestinationNotFound,
            4 => ProxyError::DestinationUnavailable,
            5 => ProxyError::DestinationIpProhibited,
            6 => ProxyError::DestinationIpUnroutable,
            7 => ProxyError::ConnectionRefused,
            9 => ProxyError::ConnectionTimeout,
            13 => ProxyError::TlsProtocolError,
            14 => ProxyError::TlsCertificateError,
            15 => ProxyError::TlsAlertReceived,
            11 => ProxyError::HttpRequestDenied,
            12 => ProxyError::HttpRequestError,
            18 => ProxyError::HttpResponseIncomplete,
            26 => ProxyError::HttpResponseTimeout,
            27 => ProxyError::HttpUpgradeFailed,
            28 => ProxyError::HttpProtocolError,
            23 => ProxyError::ProxyConfigurationError,
            24 => ProxyError::ProxyInternalError,
            _ => return None,
        })
    }
}

/// Formats a Proxy-Status field value: `proxy; error=token; details="..."`.
///
/// `details` is made a valid sf-string: only printable ASCII survives,
/// quotes and backslashes are escaped (RFC 8941 section 3.3.3).
pub fn format(proxy_name: &str, error: ProxyError, details: Option<&str>) -> String {
    format_received(proxy_name, error, None, details)
}

/// Like [`format`], with the `received-status` parameter (section 2.1.2):
/// the status the next hop answered, e.g. the 403 of an upstream that
/// refused a WebSocket upgrade.
pub fn format_received(
    proxy_name: &str,
    error: ProxyError,
    received_status: Option<u16>,
    details: Option<&str>,
) -> String {
    let mut out = format!("{proxy_name}; error={}", error.as_str());
    if let Some(status) = received_status {
        out.push_str(&std::format!("; received-status={status}"));
    }
    if let Some(details) = details {
        out.push_str("; details=\"");
        for c in details.chars().filter(|c| (' '..='~').contains(c)) {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_tokens_and_escapes_details() {
        assert_eq!(
            format("relay", ProxyError::DestinationIpProhibited, None),
            "relay; error=destination_ip_prohibited"
        );
        assert_eq!(
            format("relay", ProxyError::DnsError, Some("no \"such\" host\\\n")),
            "relay; error=dns_error; details=\"no \\\"such\\\" host\\\\\""
        );
    }

    #[test]
    fn received_status_is_a_parameter() {
        assert_eq!(
            format_received("relay", ProxyError::HttpUpgradeFailed, Some(403), Some("upstream refused")),
            "relay; error=http_upgrade_failed; received-status=403; details=\"upstream refused\""
        );
    }

    #[test]
    fn codes_round_trip() {
        for v in 0..=255u8 {
            if let Some(e) = ProxyError::from_u8(v) {
                assert_eq!(e as u8, v);
            }
        }
        assert_eq!(ProxyError::from_u8(24), Some(ProxyError::ProxyInternalError));
        assert_eq!(ProxyError::from_u8(0), None);
        // The TLS errors towards origins (wss://).
        for (v, token) in
            [(13, "tls_protocol_error"), (14, "tls_certificate_error"), (15, "tls_alert_received")]
        {
            assert_eq!(ProxyError::from_u8(v).map(ProxyError::as_str), Some(token));
        }
    }
}
