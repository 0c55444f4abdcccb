//! The connect-udp (RFC 9298 section 2) and connect-ip (RFC 9484 section 3)
//! URI templates (RFC 6570).
//!
//! Operators configure a template such as
//! `/.well-known/masque/udp/{target_host}/{target_port}/` (or a full
//! `https://authority/...` URI, whose authority is ignored here). Requests are
//! matched against it; variables are expanded by clients with RFC 6570
//! simple string expansion (`{var}`) or form-style query expansion
//! (`{?target_host,target_port}`), so a variable's value never contains a
//! raw reserved character and matching is unambiguous.
//!
//! The two kinds are separate types sharing one parser: [`UriTemplate`] for
//! connect-udp, whose two variables are both required, and
//! [`IpUriTemplate`] for connect-ip, whose `target` and `ipproto` are both
//! optional (a template without variables, like `/vpn`, is valid and means
//! `*` for both, RFC 9484 section 4.6).
#![forbid(unsafe_code)]

/// The two variables a connect-udp template must carry.
pub const VARIABLES: [&str; 2] = ["target_host", "target_port"];

/// The two variables a connect-ip template may carry, each at most once
/// (RFC 9484 section 3).
pub const IP_VARIABLES: [&str; 2] = ["target", "ipproto"];

/// The default connect-ip template's path (RFC 9484 section 3:
/// `https://$PROXY_HOST:$PROXY_PORT/.well-known/masque/ip/{target}/{ipproto}/`).
pub const DEFAULT_IP_TEMPLATE: &str = "/.well-known/masque/ip/{target}/{ipproto}/";

/// Longest request path the matcher looks at; longer paths are refused
/// before any work is done.
pub const MAX_PATH_LEN: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Var(usize),
    Query(Vec<usize>),
}

/// A parsed, validated connect-udp URI template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UriTemplate {
    source: String,
    parts: Vec<Part>,
}

/// Why a configured template is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// The template (after removing any scheme and authority) does not start
    /// with '/'.
    #[error("the template's path must start with '/'")]
    NotAbsolutePath,
    /// An expression is not closed.
    #[error("unclosed '{{' in the template")]
    Unclosed,
    /// An expression uses an operator or variable this relay does not know:
    /// only `{var}` and `{?var,...}` with the template kind's variables
    /// (`target_host`, `target_port` or `target`, `ipproto`) are supported.
    #[error("unsupported expression {{{0}}}: use {{var}} or {{?var,...}} with this template's variables")]
    Unsupported(String),
    /// A variable is missing or appears twice.
    #[error("the template must contain target_host and target_port exactly once each")]
    Variables,
    /// A connect-ip template names `target` or `ipproto` more than once.
    #[error("a connect-ip template may contain target and ipproto at most once each")]
    IpVariables,
    /// A query expression is not the last part of the template.
    #[error("a {{?...}} expression must end the template")]
    QueryNotLast,
    /// Two variables follow each other with no literal between them.
    #[error("two variables must be separated by a literal character")]
    Adjacent,
    /// A template literal holds a character that is not allowed in a path.
    #[error("the template contains a character not allowed in a URI path: {0:?}")]
    BadLiteral(char),
}

/// Values extracted from a matching path, percent-decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateMatch {
    /// Decoded `target_host`.
    pub target_host: String,
    /// Decoded `target_port`.
    pub target_port: String,
}

/// Why a path did not yield target values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MatchError {
    /// The path does not have the template's shape (answered with 404).
    #[error("path does not match the URI template")]
    NoMatch,
    /// The path matches but a value is not valid percent-encoded UTF-8
    /// (answered with 400).
    #[error("bad percent-encoding in a template variable")]
    BadEncoding,
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._~!$&'()*+,;=:@/%?".contains(c)
}

/// Splits a template into parts, counting how often each of `names` occurs.
fn parse_parts(template: &str, names: &[&str; 2]) -> Result<(Vec<Part>, [u8; 2]), TemplateError> {
    let path = match template.strip_prefix("https://") {
        Some(rest) => rest.find('/').map(|i| &rest[i..]).ok_or(TemplateError::NotAbsolutePath)?,
        None => template,
    };
    if !path.starts_with('/') {
        return Err(TemplateError::NotAbsolutePath);
    }
    let mut parts = Vec::new();
    let mut seen = [0u8; 2];
    let mut rest = path;
    while !rest.is_empty() {
        if let Some(body) = rest.strip_prefix('{') {
            let end = body.find('}').ok_or(TemplateError::Unclosed)?;
            let expr = &body[..end];
            rest = &body[end + 1..];
            let var_index = |name: &str| {
                names
                    .iter()
                    .position(|v| *v == name)
                    .ok_or_else(|| TemplateError::Unsupported(expr.to_string()))
            };
            if let Some(list) = expr.strip_prefix('?') {
                let vars = list.split(',').map(var_index).collect::<Result<Vec<_>, _>>()?;
                for v in &vars {
                    // Saturating: a variable repeated hundreds of times is
                    // refused by the callers' "at most once" checks.
                    seen[*v] = seen[*v].saturating_add(1);
                }
                parts.push(Part::Query(vars));
            } else {
                let v = var_index(expr)?;
                seen[v] = seen[v].saturating_add(1);
                if matches!(parts.last(), Some(Part::Var(_))) {
                    return Err(TemplateError::Adjacent);
                }
                parts.push(Part::Var(v));
            }
        } else {
            let end = rest.find('{').unwrap_or(rest.len());
            let literal = &rest[..end];
            if let Some(bad) = literal.chars().find(|c| !is_path_char(*c)) {
                return Err(TemplateError::BadLiteral(bad));
            }
            parts.push(Part::Literal(literal.to_string()));
            rest = &rest[end..];
        }
    }
    if let Some(pos) = parts.iter().position(|p| matches!(p, Part::Query(_)))
        && pos != parts.len() - 1
    {
        return Err(TemplateError::QueryNotLast);
    }
    Ok((parts, seen))
}

/// Matches `path` against `parts` and returns the raw (still
/// percent-encoded) value of each variable found. A `{var}` value is a run of
/// unreserved characters and `%` escapes, plus `*` when `star` is set.
fn match_parts<'p>(
    parts: &[Part],
    names: &[&str; 2],
    path: &'p str,
    star: bool,
) -> Result<[Option<&'p str>; 2], MatchError> {
    if path.len() > MAX_PATH_LEN {
        return Err(MatchError::NoMatch);
    }
    let mut raw: [Option<&str>; 2] = [None, None];
    let mut rest = path;
    for part in parts {
        match part {
            Part::Literal(l) => rest = rest.strip_prefix(l.as_str()).ok_or(MatchError::NoMatch)?,
            Part::Var(v) => {
                let end = rest
                    .bytes()
                    .position(|b| !(is_unreserved(b) || b == b'%' || (star && b == b'*')))
                    .unwrap_or(rest.len());
                raw[*v] = Some(&rest[..end]);
                rest = &rest[end..];
            }
            Part::Query(vars) => {
                let query = match rest.strip_prefix('?') {
                    Some(q) => q,
                    None if rest.is_empty() => "",
                    None => return Err(MatchError::NoMatch),
                };
                rest = "";
                for pair in query.split('&').filter(|p| !p.is_empty()) {
                    let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                    if let Some(v) = vars.iter().find(|v| names[**v] == name)
                        && raw[*v].replace(value).is_some()
                    {
                        // A variable given twice is ambiguous.
                        return Err(MatchError::NoMatch);
                    }
                }
            }
        }
    }
    if !rest.is_empty() {
        return Err(MatchError::NoMatch);
    }
    Ok(raw)
}

/// Expands `parts` with `values`; `keep` says which bytes besides the
/// unreserved ones are written unencoded.
fn expand_parts(parts: &[Part], names: &[&str; 2], values: [&str; 2], keep: &[u8]) -> String {
    let mut out = String::new();
    for part in parts {
        match part {
            Part::Literal(l) => out.push_str(l),
            Part::Var(v) => percent_encode(values[*v], keep, &mut out),
            Part::Query(vars) => {
                for (i, v) in vars.iter().enumerate() {
                    out.push(if i == 0 { '?' } else { '&' });
                    out.push_str(names[*v]);
                    out.push('=');
                    percent_encode(values[*v], keep, &mut out);
                }
            }
        }
    }
    out
}

impl UriTemplate {
    /// Parses and validates a template.
    pub fn parse(template: &str) -> Result<Self, TemplateError> {
        let (parts, seen) = parse_parts(template, &VARIABLES)?;
        if seen != [1, 1] {
            return Err(TemplateError::Variables);
        }
        Ok(Self { source: template.to_string(), parts })
    }

    /// The template as configured.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Expands the template for `host` and `port` (client side), encoding
    /// every byte that is not unreserved, as RFC 6570 simple expansion does.
    pub fn expand(&self, host: &str, port: u16) -> String {
        let port = port.to_string();
        expand_parts(&self.parts, &VARIABLES, [host, port.as_str()], b"")
    }

    /// Matches a request's `:path` and extracts the decoded variables.
    pub fn match_path(&self, path: &str) -> Result<TemplateMatch, MatchError> {
        self.match_with(path, false)
    }

    /// As [`Self::match_path`], for a bound UDP request
    /// (draft-ietf-masque-connect-udp-listen-13 section 2), whose variables
    /// may be `*`: also accepts a raw `*` in a `{var}` value, not only its
    /// encoding `%2A` that the draft makes clients send ("the '*' character
    /// MUST be percent-encoded before sending"). Either way the value
    /// decodes to `"*"`, which [`crate::target`] refuses, so only
    /// [`crate::request::classify_connect_udp_bind`] lets it through.
    pub fn match_bind_path(&self, path: &str) -> Result<TemplateMatch, MatchError> {
        self.match_with(path, true)
    }

    fn match_with(&self, path: &str, star: bool) -> Result<TemplateMatch, MatchError> {
        let [Some(host), Some(port)] = match_parts(&self.parts, &VARIABLES, path, star)? else {
            return Err(MatchError::NoMatch);
        };
        Ok(TemplateMatch { target_host: percent_decode(host)?, target_port: percent_decode(port)? })
    }
}

/// A parsed, validated connect-ip URI template (RFC 9484 section 3).
///
/// `target` and `ipproto` may each appear at most once, as `{var}` or in a
/// `{?...}` query expression, or not at all; a missing variable carries the
/// wildcard `*` (section 4.6). Matching accepts a raw `*` in a `{var}`
/// value, as in the RFC's example path `/.well-known/masque/ip/*/*/`, as well
/// as its encoding `%2A`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpUriTemplate {
    source: String,
    parts: Vec<Part>,
}

/// `target` and `ipproto` extracted from a path matching an
/// [`IpUriTemplate`], percent-decoded; `*` for a variable the template or
/// the query does not carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpTemplateMatch {
    /// Decoded `target` (see [`crate::ip::scope::parse_target`]).
    pub target: String,
    /// Decoded `ipproto` (see [`crate::ip::scope::parse_ipproto`]).
    pub ipproto: String,
}

impl IpUriTemplate {
    /// Parses and validates a connect-ip template: an absolute path (or
    /// `https://` URI), with `target` and `ipproto` at most once each and no
    /// other variables.
    pub fn parse(template: &str) -> Result<Self, TemplateError> {
        let (parts, seen) = parse_parts(template, &IP_VARIABLES)?;
        if seen.iter().any(|n| *n > 1) {
            return Err(TemplateError::IpVariables);
        }
        Ok(Self { source: template.to_string(), parts })
    }

    /// The template as configured.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Expands the template for `target` and `ipproto` (client side, values
    /// not yet encoded: `"2001:db8::/32"`, `"17"`, `"*"`). Every byte but the
    /// unreserved ones and `*` is percent-encoded, so the colons of an IPv6
    /// literal become `%3A` and the prefix slash `%2F` as RFC 9484 section
    /// 4.6 requires; `*` stays as in the RFC's examples. A variable the
    /// template lacks is dropped, which the proxy reads as `*`.
    pub fn expand_ip(&self, target: &str, ipproto: &str) -> String {
        expand_parts(&self.parts, &IP_VARIABLES, [target, ipproto], b"*")
    }

    /// Matches a request's `:path` and extracts the decoded variables,
    /// `*` for missing ones.
    pub fn match_path(&self, path: &str) -> Result<IpTemplateMatch, MatchError> {
        let [target, ipproto] = match_parts(&self.parts, &IP_VARIABLES, path, true)?;
        let decode = |v: Option<&str>| v.map_or_else(|| Ok("*".to_string()), percent_decode);
        Ok(IpTemplateMatch { target: decode(target)?, ipproto: decode(ipproto)? })
    }
}

fn percent_encode(value: &str, keep: &[u8], out: &mut String) {
    for b in value.bytes() {
        if is_unreserved(b) || keep.contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

/// Decodes `%XX` escapes; the result must be UTF-8.
pub fn percent_decode(value: &str) -> Result<String, MatchError> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or(MatchError::BadEncoding)?;
            let hex = std::str::from_utf8(hex).map_err(|_| MatchError::BadEncoding)?;
            if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(MatchError::BadEncoding);
            }
            out.push(u8::from_str_radix(hex, 16).map_err(|_| MatchError::BadEncoding)?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| MatchError::BadEncoding)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT: &str = "/.well-known/masque/udp/{target_host}/{target_port}/";

    #[test]
    fn default_template_matches_rfc_examples() {
        let t = UriTemplate::parse(DEFAULT).unwrap();
        let m = t.match_path("/.well-known/masque/udp/192.0.2.6/443/").unwrap();
        assert_eq!((m.target_host.as_str(), m.target_port.as_str()), ("192.0.2.6", "443"));
        // RFC 9298 section 2: IPv6 literals have their colons percent-encoded.
        let m = t.match_path("/.well-known/masque/udp/2001%3Adb8%3A%3A42/443/").unwrap();
        assert_eq!(m.target_host, "2001:db8::42");
        assert_eq!(t.expand("2001:db8::42", 443), "/.well-known/masque/udp/2001%3Adb8%3A%3A42/443/");
    }

    #[test]
    fn query_form_in_any_order() {
        let t = UriTemplate::parse("https://proxy.example.org/masque{?target_host,target_port}").unwrap();
        assert_eq!(t.expand("example.com", 53), "/masque?target_host=example.com&target_port=53");
        let m = t.match_path("/masque?target_port=53&target_host=example.com").unwrap();
        assert_eq!((m.target_host.as_str(), m.target_port.as_str()), ("example.com", "53"));
        assert_eq!(
            t.match_path("/masque?target_host=a&target_host=b&target_port=1"),
            Err(MatchError::NoMatch)
        );
        assert_eq!(t.match_path("/masque?target_host=a"), Err(MatchError::NoMatch));
    }

    #[test]
    fn non_matching_paths() {
        let t = UriTemplate::parse(DEFAULT).unwrap();
        for p in [
            "/",
            "/.well-known/masque/udp/a/1",
            "/.well-known/masque/udp/a/1/x",
            "/.well-known/masque/udp/a/b/1/",
            "/.well-known/masque/ip/a/1/",
            "/.well-known/masque/udp/a/1/?x=1",
        ] {
            assert_eq!(t.match_path(p), Err(MatchError::NoMatch), "{p}");
        }
        assert_eq!(t.match_path("/.well-known/masque/udp/%zz/1/"), Err(MatchError::BadEncoding));
        assert_eq!(t.match_path("/.well-known/masque/udp/%ff/1/"), Err(MatchError::BadEncoding));
    }

    #[test]
    fn bind_wildcards() {
        let t = UriTemplate::parse(DEFAULT).unwrap();
        let star = |m: TemplateMatch| (m.target_host, m.target_port);
        let both = ("*".to_string(), "*".to_string());
        assert_eq!(t.match_path("/.well-known/masque/udp/%2A/%2a/").map(star), Ok(both.clone()));
        assert_eq!(t.match_bind_path("/.well-known/masque/udp/%2A/%2A/").map(star), Ok(both.clone()));
        // A raw '*' only for bound requests.
        assert_eq!(t.match_path("/.well-known/masque/udp/*/*/"), Err(MatchError::NoMatch));
        assert_eq!(t.match_bind_path("/.well-known/masque/udp/*/*/").map(star), Ok(both));
        assert_eq!(
            t.match_bind_path("/.well-known/masque/udp/192.0.2.1/443/").map(star),
            Ok(("192.0.2.1".to_string(), "443".to_string()))
        );
        assert_eq!(t.match_bind_path("/.well-known/masque/udp/*/*/x"), Err(MatchError::NoMatch));
    }

    #[test]
    fn template_validation() {
        assert_eq!(
            UriTemplate::parse("masque/{target_host}/{target_port}"),
            Err(TemplateError::NotAbsolutePath)
        );
        assert_eq!(UriTemplate::parse("/{target_host}/{target_port"), Err(TemplateError::Unclosed));
        assert_eq!(UriTemplate::parse("/{target_host}/"), Err(TemplateError::Variables));
        assert_eq!(UriTemplate::parse("/{target_host}{target_port}"), Err(TemplateError::Adjacent));
        assert!(matches!(
            UriTemplate::parse("/{+target_host}/{target_port}"),
            Err(TemplateError::Unsupported(_))
        ));
        assert_eq!(UriTemplate::parse("/x{?target_host}/{target_port}"), Err(TemplateError::QueryNotLast));
        assert_eq!(
            UriTemplate::parse("/a b/{target_host}/{target_port}"),
            Err(TemplateError::BadLiteral(' '))
        );
    }

    const DEFAULT_IP: &str = "https://example.org/.well-known/masque/ip/{target}/{ipproto}/";

    fn ip_match(t: &IpUriTemplate, path: &str) -> Result<(String, String), MatchError> {
        t.match_path(path).map(|m| (m.target, m.ipproto))
    }

    fn pair(a: &str, b: &str) -> Result<(String, String), MatchError> {
        Ok((a.to_string(), b.to_string()))
    }

    #[test]
    fn ip_default_template() {
        let t = IpUriTemplate::parse(DEFAULT_IP).unwrap();
        assert_eq!(IpUriTemplate::parse(DEFAULT_IP_TEMPLATE).unwrap().parts, t.parts);
        // RFC 9484 Figure 4: raw '*'.
        assert_eq!(ip_match(&t, "/.well-known/masque/ip/*/*/"), pair("*", "*"));
        assert_eq!(ip_match(&t, "/.well-known/masque/ip/%2A/%2a/"), pair("*", "*"));
        assert_eq!(
            ip_match(&t, "/.well-known/masque/ip/2001%3Adb8%3A%3A%2F32/17/"),
            pair("2001:db8::/32", "17")
        );
        assert_eq!(ip_match(&t, "/.well-known/masque/ip/192.0.2.0%2F24/*/"), pair("192.0.2.0/24", "*"));
        assert_eq!(ip_match(&t, "/.well-known/masque/ip//6/"), pair("", "6"));
        assert_eq!(t.expand_ip("*", "*"), "/.well-known/masque/ip/*/*/");
        assert_eq!(t.expand_ip("2001:db8::42", "132"), "/.well-known/masque/ip/2001%3Adb8%3A%3A42/132/");
        assert_eq!(t.expand_ip("192.0.2.0/24", "*"), "/.well-known/masque/ip/192.0.2.0%2F24/*/");
        for p in [
            "/.well-known/masque/ip/*/*",
            "/.well-known/masque/ip/*/*/x",
            "/.well-known/masque/ip/a/b/c/",
            "/.well-known/masque/udp/a/1/",
            "/.well-known/masque/ip/a:b/1/",
            "/.well-known/masque/ip/a/1/?x=1",
        ] {
            assert_eq!(t.match_path(p), Err(MatchError::NoMatch), "{p}");
        }
        assert_eq!(t.match_path("/.well-known/masque/ip/%zz/1/"), Err(MatchError::BadEncoding));
    }

    #[test]
    fn ip_templates_without_or_with_some_variables() {
        // RFC 9484 section 8.1: "/vpn", no variables: both wildcards.
        let vpn = IpUriTemplate::parse("https://proxy.example.com/vpn").unwrap();
        assert_eq!(ip_match(&vpn, "/vpn"), pair("*", "*"));
        assert_eq!(vpn.match_path("/vpn/"), Err(MatchError::NoMatch));
        assert_eq!(vpn.expand_ip("192.0.2.1", "6"), "/vpn");
        let only_target = IpUriTemplate::parse("/ip/{target}").unwrap();
        assert_eq!(ip_match(&only_target, "/ip/example.com"), pair("example.com", "*"));
        // RFC 9484 Figure 1, second example.
        let t =
            IpUriTemplate::parse("https://proxy.example.org:4443/masque/ip?t={target}&i={ipproto}").unwrap();
        assert_eq!(t.expand_ip("::/0", "*"), "/masque/ip?t=%3A%3A%2F0&i=*");
        assert_eq!(ip_match(&t, "/masque/ip?t=%3A%3A%2F0&i=*"), pair("::/0", "*"));
    }

    #[test]
    fn ip_query_form() {
        // RFC 9484 section 8.3.
        let t = IpUriTemplate::parse("/proxy{?target,ipproto}").unwrap();
        assert_eq!(
            ip_match(&t, "/proxy?target=target.example.com&ipproto=132"),
            pair("target.example.com", "132")
        );
        assert_eq!(ip_match(&t, "/proxy?ipproto=17"), pair("*", "17"));
        assert_eq!(ip_match(&t, "/proxy"), pair("*", "*"));
        assert_eq!(t.match_path("/proxy?target=a&target=b"), Err(MatchError::NoMatch));
        assert_eq!(t.expand_ip("target.example.com", "132"), "/proxy?target=target.example.com&ipproto=132");
    }

    #[test]
    fn a_variable_repeated_hundreds_of_times_is_refused_not_a_panic() {
        // Found by the ip_template fuzz target (a u8 counter overflowed).
        let many = "{?ipproto}".repeat(300);
        assert!(IpUriTemplate::parse(&format!("/x/{many}")).is_err());
        let many = "/{target_host}".repeat(300);
        assert!(UriTemplate::parse(&format!("{many}/{{target_port}}/")).is_err());
    }

    #[test]
    fn ip_template_validation() {
        assert_eq!(IpUriTemplate::parse("/{target}/{target}"), Err(TemplateError::IpVariables));
        assert_eq!(IpUriTemplate::parse("/{target}{?target}"), Err(TemplateError::IpVariables));
        assert!(matches!(IpUriTemplate::parse("/{target_host}"), Err(TemplateError::Unsupported(_))));
        assert!(matches!(IpUriTemplate::parse("/{+target}"), Err(TemplateError::Unsupported(_))));
        assert_eq!(IpUriTemplate::parse("/{target}{ipproto}"), Err(TemplateError::Adjacent));
        assert_eq!(IpUriTemplate::parse("vpn"), Err(TemplateError::NotAbsolutePath));
        assert_eq!(IpUriTemplate::parse("/{?target}/x"), Err(TemplateError::QueryNotLast));
        // The connect-udp parser still wants its own two variables.
        assert!(matches!(UriTemplate::parse(DEFAULT_IP_TEMPLATE), Err(TemplateError::Unsupported(_))));
        assert_eq!(UriTemplate::parse("/vpn"), Err(TemplateError::Variables));
    }
}
