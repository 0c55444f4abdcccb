//! `relay-bench privacy-pass`: what Privacy Pass type 2 verification costs
//! at CONNECT, against bearer tokens, in one run.
//!
//! One relay accepts both schemes. Rounds alternate which goes first; each
//! round measures CONNECT -> 200 one tunnel at a time (pooled into one
//! histogram per scheme) and the rate of pipelined tunnel setups (median
//! over rounds), each request with a fresh token (a token is accepted
//! once).
//!
//! The bench is the issuer: it makes an RSA-2048 key, gives the relay its
//! public key (an SPKI with the id-RSASSA-PSS OID, RFC 9578 section 6.5)
//! and mints each token for the relay's own challenge (read from a 407)
//! as an RSASSA-PSS signature (SHA-384, MGF1-SHA-384, salt 48) over the
//! token input. That is exactly what the blind signature protocol yields
//! once unblinded, so the relay's work is the same as for an issued
//! token; blinding happens between client and issuer and costs the relay
//! nothing. (The independent client, privacypass-ts, takes about 0.4 s a
//! token here, too slow for thousands; `bench/tests/privacy_pass.rs` uses
//! it.)

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use boring::hash::MessageDigest;
use boring::pkey::{PKey, Private};
use boring::rsa::{Padding, Rsa};
use boring::sign::{RsaPssSaltlen, Signer};
use serde::Serialize;

use crate::client::{Answer, Client, ClientConfig};
use crate::processes::{Relay, RelayOptions};
use crate::setup_cost::{self, Samples, SetupFigures, ratio, round_order};
use crate::target::{Target, TargetMode};
use relay_proto::base64url::base64url_encode;
use relay_proto::privacy_pass::base64url_lenient;

/// Bound for one handshake or answer.
const T: Duration = Duration::from_secs(10);

/// What to run.
#[derive(Debug, Clone)]
pub struct PpBenchConfig {
    /// Where the relay's state, logs and `privacy-pass-report.json` go.
    pub out_dir: PathBuf,
    /// Directory of the relay binaries (default: next to this one).
    pub bin_dir: Option<PathBuf>,
    /// Rounds (each runs both schemes).
    pub rounds: usize,
    /// CONNECT -> 200 samples per scheme and round.
    pub connect_samples: usize,
    /// Pipelined tunnel setups per scheme and round.
    pub setup_flows: usize,
}

impl PpBenchConfig {
    /// The defaults of `relay-bench privacy-pass`.
    pub fn standard(out_dir: PathBuf) -> Self {
        Self { out_dir, bin_dir: None, rounds: 5, connect_samples: 400, setup_flows: 2000 }
    }
}

/// The report.
#[derive(Debug, Clone, Serialize)]
pub struct PpReport {
    /// Bearer first, then Privacy Pass.
    pub schemes: Vec<SetupFigures>,
    /// Privacy Pass p50 minus bearer p50, microseconds.
    pub p50_added_us: i64,
    /// Privacy Pass p99 minus bearer p99, microseconds.
    pub p99_added_us: i64,
    /// Privacy Pass / bearer setups per second.
    pub setups_ratio: f64,
    /// Tokens the relay accepted (its count of redeemed tokens).
    pub tokens_redeemed: u64,
    /// CPUs of the machine.
    pub cpus: usize,
}

/// The test issuer: an RSA-2048 key and its RFC 9578 SPKI.
pub struct Issuer {
    key: PKey<Private>,
    spki: Vec<u8>,
}

impl Issuer {
    /// A fresh key.
    pub fn new() -> Result<Self> {
        // The AlgorithmIdentifier of id-RSASSA-PSS with SHA-384,
        // MGF1-SHA-384 and salt 48, as privacypass-ts writes it.
        const ALG: [u8; 63] = [
            0x30, 0x3d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0a, 0x30, 0x30, 0xa0,
            0x0d, 0x30, 0x0b, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02, 0xa1, 0x1a,
            0x30, 0x18, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x08, 0x30, 0x0b, 0x06,
            0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02, 0xa2, 0x03, 0x02, 0x01, 0x30,
        ];
        let rsa = Rsa::generate(2048)?;
        let public = rsa.public_key_to_der_pkcs1()?;
        if public.len() != 270 {
            bail!("unexpected RSAPublicKey length {}", public.len());
        }
        let mut spki = vec![0x30, 0x82, 0x01, 0x52];
        spki.extend(ALG);
        spki.extend([0x03, 0x82, 0x01, 0x0f, 0x00]);
        spki.extend(public);
        Ok(Self { key: PKey::from_rsa(rsa)?, spki })
    }

    /// The public key (DER SPKI) for the relay's config.
    pub fn spki(&self) -> &[u8] {
        &self.spki
    }

    /// `n` credentials for the TokenChallenge `challenge` (its encoding).
    pub fn mint(&self, challenge: &[u8], n: usize) -> Result<Vec<String>> {
        let digest = boring::sha::sha256(challenge);
        let key_id = boring::sha::sha256(&self.spki);
        (0..n)
            .map(|_| {
                let mut input = vec![0x00, 0x02];
                let mut nonce = [0u8; 32];
                boring::rand::rand_bytes(&mut nonce)?;
                input.extend(nonce);
                input.extend(digest);
                input.extend(key_id);
                let mut s = Signer::new(MessageDigest::sha384(), &self.key)?;
                s.set_rsa_padding(Padding::PKCS1_PSS)?;
                s.set_rsa_pss_saltlen(RsaPssSaltlen::custom(48))?;
                s.set_rsa_mgf1_md(MessageDigest::sha384())?;
                s.update(&input)?;
                input.extend(s.sign_to_vec()?);
                Ok(format!("PrivateToken token={}", base64url_encode(&input)))
            })
            .collect()
    }
}

/// The type 2 TokenChallenge (its encoding) of the relay's 407 to a
/// request without credentials.
pub fn relay_challenge(cfg: &ClientConfig, target: &Target) -> Result<Vec<u8>> {
    let mut cfg = cfg.clone();
    cfg.token = None;
    let mut c = Client::connect(cfg, T)?;
    c.wait_settings(T)?;
    let t = target.addr();
    let id = c.request_udp(&t.ip().to_string(), t.port())?;
    let answer = c.wait_answer(id, T)?;
    c.close();
    let Answer::Response(headers) = &answer else { bail!("no 407: {answer:?}") };
    for (_, v) in headers.iter().filter(|(n, _)| n == "proxy-authenticate") {
        let Some(rest) = v.strip_prefix("PrivateToken challenge=\"") else { continue };
        let b64 = rest.split('"').next().unwrap_or("");
        let bytes = base64url_lenient(b64).context("challenge is not base64url")?;
        if bytes.starts_with(&[0x00, 0x02]) {
            return Ok(bytes);
        }
    }
    bail!("no type 2 PrivateToken challenge in {answer:?}")
}

fn client_config(relay: &Relay, bearer: bool) -> ClientConfig {
    let mut cfg = ClientConfig::new(relay.addr);
    cfg.ca = Some(relay.cert());
    cfg.token = bearer.then(|| relay.token.clone());
    cfg
}

fn start_relay(cfg: &PpBenchConfig, dir: &Path, issuer: &Issuer) -> Result<Relay> {
    let key = dir.join("issuer.spki");
    std::fs::write(&key, issuer.spki())?;
    let opts = RelayOptions {
        workers: 1,
        flow_idle_timeout_secs: 600,
        ask_timeout_ms: 5000,
        dataplane_extra: "max_tunnels_per_connection = 25000".into(),
        bin_dir: cfg.bin_dir.clone(),
        log_dir: Some(dir.join("logs")),
        auth_extra: "schemes = [\"bearer\", \"private_token\"]\n".into(),
        extra_config: format!(
            "[auth.privacy_pass]\nissuer_name = \"issuer.example\"\norigin_info = [\"relay.example\"]\n\
             redemption_window_secs = 3600\n\n[[auth.privacy_pass.keys]]\ntoken_type = 2\npublic_key_file = \"{}\"\n",
            key.display()
        ),
        ..RelayOptions::default()
    };
    Relay::start(&dir.join("relay"), &opts).context("starting the relay")
}

/// Runs the comparison and writes `privacy-pass-report.json` and
/// `privacy-pass-report.md` into `cfg.out_dir`.
pub fn run(cfg: &PpBenchConfig) -> Result<PpReport> {
    std::fs::create_dir_all(&cfg.out_dir)?;
    let issuer = Issuer::new()?;
    let relay = start_relay(cfg, &cfg.out_dir, &issuer)?;
    let target = Target::start("127.0.0.1:0".parse()?, TargetMode::Sink)?;
    let challenge = relay_challenge(&client_config(&relay, false), &target)?;
    let mut samples = [Samples::new("bearer"), Samples::new("privacy pass type 2")];
    for round in 0..cfg.rounds {
        for i in round_order(round) {
            let pp = i == 1;
            eprintln!("bench privacy-pass: round {}/{}: {}", round + 1, cfg.rounds, samples[i].name());
            let ccfg = client_config(&relay, !pp);
            // Minted outside the measurement: the client's cost, not the relay's.
            let tokens = |n| if pp { issuer.mint(&challenge, n) } else { Ok(Vec::new()) };
            samples[i].connect_latency(&ccfg, &target, cfg.connect_samples, tokens(cfg.connect_samples)?)?;
            samples[i].setup_rate(&ccfg, &target, cfg.setup_flows, tokens(cfg.setup_flows)?)?;
        }
    }
    let status = relay.admin(r#"{"cmd":"policy_show"}"#).unwrap_or_default();
    let redeemed = status["privacy_pass"]["redeemed"].as_u64().unwrap_or(0);
    let want = (cfg.rounds * (cfg.connect_samples + cfg.setup_flows)) as u64;
    if redeemed != want {
        bail!("the relay redeemed {redeemed} tokens, not {want}: {status}");
    }
    let schemes: Vec<SetupFigures> = samples.iter().map(Samples::figures).collect();
    let (b, p) = (&schemes[0], &schemes[1]);
    let report = PpReport {
        p50_added_us: p.connect_latency.p50_us as i64 - b.connect_latency.p50_us as i64,
        p99_added_us: p.connect_latency.p99_us as i64 - b.connect_latency.p99_us as i64,
        setups_ratio: ratio(p.setups_per_sec_median, b.setups_per_sec_median),
        tokens_redeemed: redeemed,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        schemes,
    };
    std::fs::write(cfg.out_dir.join("privacy-pass-report.json"), serde_json::to_vec_pretty(&report)?)?;
    let md = markdown(&report);
    std::fs::write(cfg.out_dir.join("privacy-pass-report.md"), &md)?;
    print!("{md}");
    Ok(report)
}

/// The report as a Markdown table.
pub fn markdown(r: &PpReport) -> String {
    let mut s = setup_cost::markdown("credential", &r.schemes);
    s += &format!(
        "\nprivacy pass - bearer: p50 {:+} us, p99 {:+} us; setups/s {:.2}x; {} tokens redeemed, each once\n",
        r.p50_added_us, r.p99_added_us, r.setups_ratio, r.tokens_redeemed
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_are_rfc_9578_type_2_tokens_for_the_challenge() {
        let issuer = Issuer::new().unwrap();
        let spki = issuer.spki();
        assert_eq!(spki.len(), 342);
        let tokens = issuer.mint(b"challenge", 2).unwrap();
        assert_ne!(tokens[0], tokens[1], "fresh nonces");
        let bytes = base64url_lenient(tokens[0].strip_prefix("PrivateToken token=").unwrap()).unwrap();
        assert_eq!(bytes.len(), 2 + 32 + 32 + 32 + 256);
        assert_eq!(&bytes[..2], &[0, 2]);
        assert_eq!(&bytes[34..66], &boring::sha::sha256(b"challenge"));
        assert_eq!(&bytes[66..98], &boring::sha::sha256(spki));
    }
}
