//! HTTP/3's parts of the tunnel interface: its HTTP Datagram path (QUIC
//! DATAGRAM frames, RFC 9297 section 2.1), its rendering of response
//! heads, and its stream error codes (RFC 9114 section 8.1).
#![forbid(unsafe_code)]

use relay_proto::datagram;

use crate::quic::DGRAM_QUEUE;
use crate::tunnel::datagrams::DatagramSupport;
use crate::tunnel::head::Head;
use crate::tunnel::{Abort, Backlog, DatagramDrop, DatagramPath};

/// HTTP/3 error codes (RFC 9114 section 8.1, RFC 9297 section 5.2).
pub mod code {
    /// H3_NO_ERROR.
    pub const NO_ERROR: u64 = 0x100;
    /// H3_INTERNAL_ERROR.
    pub const INTERNAL_ERROR: u64 = 0x102;
    /// H3_REQUEST_REJECTED.
    pub const REQUEST_REJECTED: u64 = 0x10b;
    /// H3_REQUEST_CANCELLED.
    pub const REQUEST_CANCELLED: u64 = 0x10c;
    /// H3_EXCESSIVE_LOAD.
    pub const EXCESSIVE_LOAD: u64 = 0x107;
    /// H3_MESSAGE_ERROR.
    pub const MESSAGE_ERROR: u64 = 0x10e;
    /// H3_CONNECT_ERROR.
    pub const CONNECT_ERROR: u64 = 0x10f;
    /// H3_DATAGRAM_ERROR.
    pub const DATAGRAM_ERROR: u64 = 0x33;
}

/// The HTTP/3 code a tunnel's abort resets its stream with.
pub fn abort_code(a: Abort) -> u64 {
    match a {
        Abort::Cancelled => code::REQUEST_CANCELLED,
        Abort::Message => code::MESSAGE_ERROR,
        Abort::Datagram => code::DATAGRAM_ERROR,
        Abort::Connect => code::CONNECT_ERROR,
        Abort::ExcessiveLoad => code::EXCESSIVE_LOAD,
    }
}

/// Bytes of a QUIC DATAGRAM frame's HTTP Datagram header at most: quarter
/// stream ID (8) and context ID 0 (1).
pub const DATAGRAM_HEADER_MAX: usize = 9;

/// The header list of `head`.
pub fn headers(head: &Head) -> Vec<quiche::h3::Header> {
    let mut out = Vec::with_capacity(head.fields.len() + 1);
    out.push(quiche::h3::Header::new(b":status", head.status.to_string().as_bytes()));
    for (name, value) in &head.fields {
        out.push(quiche::h3::Header::new(name.as_bytes(), value.as_bytes()));
    }
    out
}

/// One connection's datagram path.
pub struct H3Path<'a> {
    /// The connection.
    pub quic: &'a mut crate::quic::Connection,
    /// What the client's SETTINGS said.
    pub support: DatagramSupport,
}

impl DatagramPath for H3Path<'_> {
    fn support(&self) -> DatagramSupport {
        self.support
    }

    fn room(&self) -> Option<usize> {
        self.quic.dgram_max_writable_len().map(|m| m.saturating_sub(DATAGRAM_HEADER_MAX))
    }

    /// Encodes the frame straight into the buffer quiche queues (one copy
    /// of the payload; encoding into a scratch buffer and handing quiche
    /// the slice copied it twice), taken from the thread's recycled frame
    /// buffers ([`crate::dgram_buf`]). quiche measures the room itself
    /// (from the path MTU and the connection IDs, each time): a frame over
    /// it, or a connection without datagrams, is refused there and dropped
    /// as too large, its buffer going back to the list; measuring it here
    /// first too cost a second measurement per datagram.
    fn send(&mut self, stream: u64, context_id: u64, payload: &[u8]) -> Result<(), DatagramDrop> {
        let len = datagram::header_len(stream, context_id) + payload.len();
        let mut frame = crate::dgram_buf::take(len);
        datagram::encode_into(stream, context_id, payload, &mut frame);
        match self.quic.dgram_send_buf(frame.into()) {
            Ok(()) => Ok(()),
            Err(quiche::Error::Done) => Err(DatagramDrop::QueueFull),
            Err(_) => Err(DatagramDrop::TooLarge),
        }
    }

    fn backlog(&self) -> Backlog {
        backlog_of(self.quic.dgram_send_queue_len())
    }
}

/// DATAGRAM frames queued on a connection at which its connect-udp
/// tunnels stop reading their targets: half of quiche's queue, so what
/// the backend already received still fits.
pub const PAUSE_AT: usize = DGRAM_QUEUE / 2;
/// Queued frames at or below which paused tunnels read again.
pub const RESUME_AT: usize = DGRAM_QUEUE / 4;
// Hysteresis between the marks, and room above the pause mark.
const _: () = assert!(RESUME_AT < PAUSE_AT && PAUSE_AT < DGRAM_QUEUE);

/// The backlog of a connection with `queued` DATAGRAM frames waiting.
pub fn backlog_of(queued: usize) -> Backlog {
    if queued >= PAUSE_AT {
        Backlog::High
    } else if queued <= RESUME_AT {
        Backlog::Low
    } else {
        Backlog::Middle
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quiche::h3::NameValue;

    #[test]
    fn heads_render_with_status_first() {
        let h = headers(&Head::tunnel_open(true));
        assert_eq!(h[0].name(), b":status");
        assert_eq!(h[0].value(), b"200");
        assert_eq!(h[1].name(), b"capsule-protocol");
        assert_eq!(abort_code(Abort::Datagram), 0x33);
    }

    #[test]
    fn the_backlog_has_a_pause_mark_and_a_lower_resume_mark() {
        assert_eq!(backlog_of(0), Backlog::Low);
        assert_eq!(backlog_of(RESUME_AT), Backlog::Low);
        assert_eq!(backlog_of(RESUME_AT + 1), Backlog::Middle);
        assert_eq!(backlog_of(PAUSE_AT - 1), Backlog::Middle);
        assert_eq!(backlog_of(PAUSE_AT), Backlog::High);
        assert_eq!(backlog_of(DGRAM_QUEUE), Backlog::High);
    }
}
