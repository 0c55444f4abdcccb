//! The record header and the field codecs every record kind is built from.
//!
//! Header (little endian): `version u8, kind u8, payload_len u16, reserved
//! u32`. Strings and blobs are `u16` length-prefixed and checked against a
//! per-field limit; addresses carry their family; nothing is trusted.
#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use super::{IpAssignment, IpRoute, MAX_IDENTITY, MAX_PAYLOAD, RecordError, VERSION};
use crate::channel::RECORD_SIZE;

/// Bytes of the record header.
pub(super) const HEADER_LEN: usize = 8;

fn ip_value(ip: IpAddr) -> (u128, u8) {
    match ip {
        IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32),
        IpAddr::V6(v6) => (u128::from(v6), 128),
    }
}

/// A prefix length within the family, host bits zero.
fn valid_prefix(addr: IpAddr, len: u8) -> bool {
    let (value, bits) = ip_value(addr);
    if len > bits {
        return false;
    }
    let host_bits = u32::from(bits - len);
    host_bits >= 128 || value & ((1u128 << host_bits) - 1) == 0
}

/// A range of one family, start not after end.
fn valid_route(r: &IpRoute) -> bool {
    r.start.is_ipv4() == r.end.is_ipv4() && ip_value(r.start).0 <= ip_value(r.end).0
}

/// Identities are printable ASCII without spaces (quota keys).
fn valid_identity(id: &str) -> bool {
    id.bytes().all(|b| b.is_ascii_graphic())
}

/// Writes a record's payload after the header room, then the header.
pub(super) struct Writer<'a> {
    buf: &'a mut [u8; RECORD_SIZE],
    pos: usize,
}

impl<'a> Writer<'a> {
    /// Starts a record in `buf`.
    pub(super) fn new(buf: &'a mut [u8; RECORD_SIZE]) -> Self {
        Self { buf, pos: HEADER_LEN }
    }

    /// Writes the header for a payload of everything written so far.
    pub(super) fn finish(self, kind: u8) {
        let payload_len = self.pos - HEADER_LEN;
        self.buf[0] = VERSION;
        self.buf[1] = kind;
        self.buf[2..4].copy_from_slice(&(payload_len as u16).to_le_bytes());
        self.buf[4..8].fill(0);
    }

    pub(super) fn bytes(&mut self, b: &[u8]) -> Result<(), RecordError> {
        let end = self.pos + b.len();
        if end > RECORD_SIZE {
            return Err(RecordError::PayloadLength(end - HEADER_LEN));
        }
        self.buf[self.pos..end].copy_from_slice(b);
        self.pos = end;
        Ok(())
    }
    pub(super) fn u8(&mut self, v: u8) -> Result<(), RecordError> {
        self.bytes(&[v])
    }
    pub(super) fn u16(&mut self, v: u16) -> Result<(), RecordError> {
        self.bytes(&v.to_le_bytes())
    }
    pub(super) fn u32(&mut self, v: u32) -> Result<(), RecordError> {
        self.bytes(&v.to_le_bytes())
    }
    pub(super) fn u64(&mut self, v: u64) -> Result<(), RecordError> {
        self.bytes(&v.to_le_bytes())
    }
    pub(super) fn str(&mut self, s: &str, limit: usize, name: &'static str) -> Result<(), RecordError> {
        if s.len() > limit {
            return Err(RecordError::FieldTooLong(name));
        }
        self.u16(s.len() as u16)?;
        self.bytes(s.as_bytes())
    }
    pub(super) fn blob(&mut self, b: &[u8], limit: usize, name: &'static str) -> Result<(), RecordError> {
        if b.len() > limit {
            return Err(RecordError::FieldTooLong(name));
        }
        self.u16(b.len() as u16)?;
        self.bytes(b)
    }
    pub(super) fn ip(&mut self, ip: IpAddr) -> Result<(), RecordError> {
        match ip {
            IpAddr::V4(v4) => {
                self.u8(4)?;
                self.bytes(&v4.octets())
            }
            IpAddr::V6(v6) => {
                self.u8(6)?;
                self.bytes(&v6.octets())
            }
        }
    }
    pub(super) fn prefix(&mut self, a: &IpAssignment) -> Result<(), RecordError> {
        if !valid_prefix(a.addr, a.len) {
            return Err(RecordError::BadValue("prefix"));
        }
        self.ip(a.addr)?;
        self.u8(a.len)
    }
    pub(super) fn route(&mut self, r: &IpRoute) -> Result<(), RecordError> {
        if !valid_route(r) {
            return Err(RecordError::BadValue("route"));
        }
        self.ip(r.start)?;
        self.ip(r.end)?;
        self.u8(r.protocol)
    }
    pub(super) fn identity(&mut self, id: &str) -> Result<(), RecordError> {
        if !valid_identity(id) {
            return Err(RecordError::BadValue("identity"));
        }
        self.str(id, MAX_IDENTITY, "identity")
    }
    pub(super) fn addr(&mut self, a: SocketAddr) -> Result<(), RecordError> {
        let (family, ip) = match a.ip() {
            IpAddr::V4(v4) => (4u8, v4.to_ipv6_mapped().octets()),
            IpAddr::V6(v6) => (6u8, v6.octets()),
        };
        self.u8(family)?;
        self.bytes(&ip)?;
        self.u16(a.port())
    }
}

/// Reads a record's payload; every read is bounded by the payload length.
pub(super) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Checks the header of `buf` (a private copy of a slot) and returns the
    /// record kind and a reader over exactly its payload.
    pub(super) fn open(buf: &'a [u8]) -> Result<(u8, Self), RecordError> {
        if buf.len() < HEADER_LEN {
            return Err(RecordError::Truncated);
        }
        if buf[0] != VERSION {
            return Err(RecordError::Version(buf[0]));
        }
        let payload_len = usize::from(u16::from_le_bytes([buf[2], buf[3]]));
        if payload_len > MAX_PAYLOAD {
            return Err(RecordError::PayloadLength(payload_len));
        }
        let payload = buf.get(HEADER_LEN..HEADER_LEN + payload_len).ok_or(RecordError::Truncated)?;
        Ok((buf[1], Self { buf: payload }))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], RecordError> {
        if self.buf.len() < n {
            return Err(RecordError::Truncated);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], RecordError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
    /// 32 raw bytes (a digest).
    pub(super) fn array32(&mut self) -> Result<[u8; 32], RecordError> {
        self.array()
    }
    pub(super) fn u8(&mut self) -> Result<u8, RecordError> {
        Ok(self.take(1)?[0])
    }
    pub(super) fn u16(&mut self) -> Result<u16, RecordError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    pub(super) fn u32(&mut self) -> Result<u32, RecordError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub(super) fn u64(&mut self) -> Result<u64, RecordError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    /// A 0/1 byte.
    pub(super) fn bool(&mut self, name: &'static str) -> Result<bool, RecordError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(RecordError::BadValue(name)),
        }
    }
    pub(super) fn str(&mut self, limit: usize, name: &'static str) -> Result<String, RecordError> {
        let len = usize::from(self.u16()?);
        if len > limit {
            return Err(RecordError::FieldTooLong(name));
        }
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| RecordError::NotUtf8(name))
    }
    pub(super) fn blob(&mut self, limit: usize, name: &'static str) -> Result<Vec<u8>, RecordError> {
        let len = usize::from(self.u16()?);
        if len > limit {
            return Err(RecordError::FieldTooLong(name));
        }
        Ok(self.take(len)?.to_vec())
    }
    pub(super) fn addr(&mut self, name: &'static str) -> Result<SocketAddr, RecordError> {
        let family = self.u8()?;
        let v6 = Ipv6Addr::from(self.array::<16>()?);
        let port = self.u16()?;
        let ip = match family {
            4 => IpAddr::V4(v6.to_ipv4_mapped().ok_or(RecordError::BadValue(name))?),
            6 => IpAddr::V6(v6),
            _ => return Err(RecordError::BadValue(name)),
        };
        Ok(SocketAddr::new(ip, port))
    }
    pub(super) fn ip(&mut self) -> Result<IpAddr, RecordError> {
        match self.u8()? {
            4 => Ok(IpAddr::V4(self.array::<4>()?.into())),
            6 => Ok(IpAddr::V6(self.array::<16>()?.into())),
            _ => Err(RecordError::BadValue("ip_version")),
        }
    }
    pub(super) fn prefix(&mut self) -> Result<IpAssignment, RecordError> {
        let addr = self.ip()?;
        let len = self.u8()?;
        if valid_prefix(addr, len) {
            Ok(IpAssignment { addr, len })
        } else {
            Err(RecordError::BadValue("prefix"))
        }
    }
    pub(super) fn route(&mut self) -> Result<IpRoute, RecordError> {
        let r = IpRoute { start: self.ip()?, end: self.ip()?, protocol: self.u8()? };
        if valid_route(&r) { Ok(r) } else { Err(RecordError::BadValue("route")) }
    }
    pub(super) fn identity(&mut self) -> Result<String, RecordError> {
        let id = self.str(MAX_IDENTITY, "identity")?;
        if valid_identity(&id) { Ok(id) } else { Err(RecordError::BadValue("identity")) }
    }
    /// Checks that the whole payload was read.
    pub(super) fn end(&self) -> Result<(), RecordError> {
        if self.buf.is_empty() { Ok(()) } else { Err(RecordError::Trailing) }
    }
}
