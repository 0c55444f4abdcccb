//! Reading untrusted keys without trusting their size or type: a key that
//! another writer turned into a huge string or into a hash is refused like
//! any other bad value, rather than read whole or turned into a command
//! error that would tear the connection down.
#![forbid(unsafe_code)]

use redis::Connection;

use super::codec::ValueError;
use super::connect::StoreError;

/// What a bounded read found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read {
    /// No such key.
    Missing,
    /// The key holds another type than a string.
    WrongType(String),
    /// At most `max + 1` bytes of the value (more than `max` means too
    /// long; the decoders refuse it).
    Value(Vec<u8>),
}

impl Read {
    /// The value, or the refusal to count (`None` for a missing key).
    pub fn into_value(self) -> Option<Result<Vec<u8>, ValueError>> {
        match self {
            Read::Missing => None,
            Read::WrongType(t) => Some(Err(ValueError::Invalid(format!(
                "the key holds a {}, not a string",
                t.chars().take(16).collect::<String>()
            )))),
            Read::Value(v) => Some(Ok(v)),
        }
    }
}

/// Reads at most `max + 1` bytes of string key `key` (two round trips:
/// `TYPE`, then `GETRANGE`).
pub fn read_bounded(con: &mut Connection, key: &str, max: usize) -> Result<Read, StoreError> {
    let kind: String = redis::cmd("TYPE").arg(key).query(con)?;
    match kind.as_str() {
        "none" => Ok(Read::Missing),
        "string" => {
            let bytes: Vec<u8> = redis::cmd("GETRANGE").arg(key).arg(0).arg(max).query(con)?;
            Ok(Read::Value(bytes))
        }
        other => Ok(Read::WrongType(other.to_string())),
    }
}

/// Reads a small number (a version hint); anything else is `None`.
pub fn read_number(con: &mut Connection, key: &str) -> Result<Option<u64>, StoreError> {
    Ok(match read_bounded(con, key, 24)? {
        Read::Value(v) => std::str::from_utf8(&v).ok().and_then(|s| s.parse().ok()),
        _ => None,
    })
}

/// Whether a command (or one command of a pipeline) failed because a key
/// holds the wrong type.
pub fn is_wrong_type(e: &redis::RedisError) -> bool {
    e.code() == Some("WRONGTYPE")
        || e.clone()
            .into_server_errors()
            .is_some_and(|errors| errors.iter().any(|(_, s)| s.code() == "WRONGTYPE"))
}
