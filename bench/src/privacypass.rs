//! The independent Privacy Pass client and test issuer of the tests
//! (`bench/privacypass/pp.mjs`, on Cloudflare's `@cloudflare/privacypass-ts`,
//! installed by `cargo xtask setup` with `npm ci`): key pairs for the
//! relay's config, and tokens for the challenges the relay sends.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The client's folder (package.json, package-lock.json, pp.mjs).
pub fn client_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("privacypass")
}

/// What is missing to run the client, or `None`.
pub fn missing() -> Option<String> {
    let installed = client_dir().join("node_modules/@cloudflare/privacypass-ts/package.json");
    let node = Command::new("node").arg("--version").output();
    match node {
        Ok(o) if o.status.success() && installed.exists() => None,
        Ok(o) if o.status.success() => Some(format!(
            "the Privacy Pass client's packages ({}: `cargo xtask setup`, or `npm ci` there)",
            installed.display()
        )),
        _ => Some(
            "node (20 or later) is not on PATH: `cargo xtask setup` (as root) or apt-get install nodejs npm"
                .into(),
        ),
    }
}

/// A test issuer: its keys in a directory.
#[derive(Debug, Clone)]
pub struct Issuer {
    dir: PathBuf,
}

/// Which token type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    /// 0x0001, VOPRF(P-384).
    Voprf,
    /// 0x0002, Blind RSA 2048.
    BlindRsa,
}

impl TokenType {
    fn arg(self) -> &'static str {
        match self {
            TokenType::Voprf => "1",
            TokenType::BlindRsa => "2",
        }
    }
}

fn node(args: &[&str]) -> Result<String> {
    let out = Command::new("node")
        .arg(client_dir().join("pp.mjs"))
        .args(args)
        .current_dir(client_dir())
        .output()
        .context("running node")?;
    if !out.status.success() {
        bail!("pp.mjs {}: {}", args.first().unwrap_or(&""), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}

impl Issuer {
    /// New key pairs of both types in `dir`.
    pub fn generate(dir: &Path) -> Result<Self> {
        let d = dir.to_str().context("a UTF-8 path")?;
        node(&["keygen", d])?;
        Ok(Self { dir: dir.to_path_buf() })
    }

    /// The type 2 public key file (SPKI, id-RSASSA-PSS, DER).
    pub fn blind_rsa_public_key(&self) -> PathBuf {
        self.dir.join("blind-rsa.spki")
    }

    /// The type 1 private key file (hex, mode 0600).
    pub fn voprf_private_key(&self) -> PathBuf {
        self.dir.join("voprf.secret")
    }

    fn run(&self, cmd: &str, t: TokenType, challenges: &[String], extra: &[&str]) -> Result<Vec<String>> {
        let d = self.dir.to_str().context("a UTF-8 path")?;
        let joined = challenges.join("\n");
        let mut args = vec![cmd, d, t.arg(), joined.as_str()];
        args.extend_from_slice(extra);
        Ok(node(&args)?.lines().map(str::to_string).collect())
    }

    /// `count` credentials (`PrivateToken token=...`) for the relay's
    /// challenge of type `t` among `challenges` (its Proxy-Authenticate
    /// values); the challenge must name this issuer's key.
    pub fn tokens(&self, t: TokenType, challenges: &[String], count: usize) -> Result<Vec<String>> {
        let n = count.to_string();
        self.run("token", t, challenges, &[n.as_str()])
    }

    /// One credential for the relay's challenge.
    pub fn token(&self, t: TokenType, challenges: &[String]) -> Result<String> {
        self.tokens(t, challenges, 1)?.pop().context("no token printed")
    }

    /// A credential from this issuer's key for a challenge that named
    /// another key.
    pub fn token_any_key(&self, t: TokenType, challenges: &[String]) -> Result<String> {
        self.run("token-any-key", t, challenges, &[])?.pop().context("no token printed")
    }

    /// A credential for the relay's challenge with another origin.
    pub fn token_for_origin(&self, t: TokenType, challenges: &[String], origin: &str) -> Result<String> {
        self.run("token-other-origin", t, challenges, &[origin])?.pop().context("no token printed")
    }
}
