//! `[[auth.mtls.identities]]`: which identity a client certificate is.
#![forbid(unsafe_code)]

use relay_proto::channel::record::ClientCert;

use crate::config::{CertField, CertIdentityRule};

/// Whether `name` (a name of `field`) satisfies the rule's `equals` or
/// `suffix`: DNS names compare ASCII case-insensitively, the others
/// exactly.
fn matches(rule: &CertIdentityRule, name: &str) -> bool {
    let dns = rule.field == CertField::SanDns;
    let eq = |a: &str, b: &str| if dns { a.eq_ignore_ascii_case(b) } else { a == b };
    if let Some(want) = &rule.equals {
        return eq(name, want);
    }
    if let Some(suffix) = &rule.suffix {
        return name.len() >= suffix.len()
            && name.is_char_boundary(name.len() - suffix.len())
            && eq(&name[name.len() - suffix.len()..], suffix);
    }
    false
}

/// The identity of the first rule `cert` matches.
pub fn map<'a>(rules: &'a [CertIdentityRule], cert: &ClientCert) -> Option<&'a str> {
    rules
        .iter()
        .find(|rule| {
            let names: &[String] = match rule.field {
                CertField::SubjectCn => cert.subject_cn.as_slice(),
                CertField::SanDns => &cert.dns_names,
                CertField::SanUri => &cert.uris,
            };
            names.iter().any(|n| matches(rule, n))
        })
        .map(|rule| rule.name.as_str())
}

/// Checks one rule's values (config validation).
pub fn check_rule(rule: &CertIdentityRule) -> Result<(), String> {
    if !crate::token::valid_subject(&rule.name) {
        return Err(format!("identity name {:?} must be [A-Za-z0-9._~-]{{1,64}}", rule.name));
    }
    match (&rule.equals, &rule.suffix) {
        (Some(v), None) | (None, Some(v)) if !v.is_empty() && v.len() <= 255 => Ok(()),
        (Some(_), Some(_)) | (None, None) => {
            Err(format!("identity {:?}: set exactly one of equals, suffix", rule.name))
        }
        _ => Err(format!("identity {:?}: the value must be 1..=255 bytes", rule.name)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str, field: CertField, equals: Option<&str>, suffix: Option<&str>) -> CertIdentityRule {
        CertIdentityRule {
            name: name.into(),
            field,
            equals: equals.map(Into::into),
            suffix: suffix.map(Into::into),
        }
    }

    fn cert() -> ClientCert {
        ClientCert {
            serial: vec![1],
            issuer_digest: [0; 32],
            subject_cn: Some("Ingress EU".into()),
            dns_names: vec!["ingress.EU.example.com".into()],
            uris: vec!["spiffe://example.com/ingress/eu".into()],
        }
    }

    #[test]
    fn first_matching_rule_wins_by_field() {
        let rules = vec![
            rule("by-uri", CertField::SanUri, Some("spiffe://example.com/ingress/us"), None),
            rule("by-dns", CertField::SanDns, None, Some(".eu.example.com")),
            rule("by-cn", CertField::SubjectCn, Some("Ingress EU"), None),
        ];
        assert_eq!(map(&rules, &cert()), Some("by-dns"), "DNS suffixes ignore ASCII case");
        assert_eq!(map(&rules[2..], &cert()), Some("by-cn"));
        assert_eq!(map(&[rule("x", CertField::SubjectCn, Some("ingress eu"), None)], &cert()), None);
        assert_eq!(map(&[rule("x", CertField::SanUri, None, Some("/eu"))], &cert()), Some("x"));
        assert_eq!(map(&[rule("x", CertField::SanDns, Some("example.com"), None)], &cert()), None);
        assert_eq!(map(&[], &cert()), None);
        let mut bare = cert();
        bare.subject_cn = None;
        assert_eq!(map(&rules[2..], &bare), None);
    }

    #[test]
    fn rules_are_checked() {
        assert!(check_rule(&rule("ok", CertField::SanDns, Some("a"), None)).is_ok());
        assert!(check_rule(&rule("bad name", CertField::SanDns, Some("a"), None)).is_err());
        assert!(check_rule(&rule("x", CertField::SanDns, Some("a"), Some("b"))).is_err());
        assert!(check_rule(&rule("x", CertField::SanDns, None, None)).is_err());
        assert!(check_rule(&rule("x", CertField::SanDns, Some(""), None)).is_err());
    }
}
