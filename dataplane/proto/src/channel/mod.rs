//! The shared-memory channel between the dataplane and control.
//!
//! Control creates one memfd region; both processes map it. The region holds
//! a header, then per dataplane worker a block of counters and two SPSC rings
//! of fixed-size records: `asks` (worker -> control) and `answers`
//! (control -> worker). Each side rings the other's eventfd doorbell after
//! pushing. Both sides copy a record out of the ring before decoding it and
//! validate everything they read, so a buggy or compromised peer can make a
//! request fail but cannot corrupt the reader's memory or state.
//!
//! - [`record`]: the record codecs (no unsafe).
//! - [`ring`]: the SPSC ring over shared memory (unsafe, small).
//! - [`region`]: the region layout, memfd creation and mapping, counters.

pub mod bootstrap;
pub mod doorbell;
pub mod fdpass;
pub mod record;
pub mod region;
pub mod ring;

/// Bytes in one record slot.
pub const RECORD_SIZE: usize = 4096;

/// Record slots per ring (a power of two).
pub const RING_SLOTS: u32 = 512;
