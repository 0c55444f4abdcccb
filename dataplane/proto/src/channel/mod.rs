//! The shared-memory channel's pure half: what control and the dataplane
//! say to each other, without the memory or the sockets they say it over
//! (those are `relay-channel`'s).
//!
//! Control creates one memfd region; both processes map it. The region holds
//! a header, then per dataplane worker a block of counters and two SPSC rings
//! of fixed-size records: `asks` (worker -> control, [`record::AskRecord`])
//! and `answers` (control -> worker, [`record::AnswerRecord`]). Both sides
//! copy a record out of the ring before decoding it here, and the decoders
//! validate everything they read, so a buggy or compromised peer can make a
//! request fail but cannot corrupt the reader's memory or state.
//!
//! - [`record`]: the record codecs.
//! - [`bootstrap`]: the attach handshake's messages and frame codec.
#![forbid(unsafe_code)]

pub mod bootstrap;
pub mod record;

/// Bytes in one record slot.
pub const RECORD_SIZE: usize = 4096;
