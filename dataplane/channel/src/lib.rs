//! The shared-memory channel between the relay's dataplane and control:
//! everything that makes system calls or touches memory the other process
//! can write. What travels over it (the record and handshake codecs) is
//! `relay_proto::channel`'s, which is pure.
//!
//! Control creates one memfd region per attached dataplane, sized and
//! sealed (it can no longer shrink or grow, and no seal can be added), and
//! passes it with two eventfd doorbells per worker over its Unix socket.
//! The region holds a header, then per worker a block of counters and two
//! single-producer single-consumer rings of fixed-size records: asks
//! (worker -> control) and answers (control -> worker).
//!
//! The dataplane faces the Internet and control holds the keys, so each
//! side treats the other's memory as hostile: a peer index is validated
//! before use, a slot is copied into private memory with atomic word loads
//! before anything looks at it (no reference to the shared slot is ever
//! made), and only the copy is decoded and validated. A peer can make a
//! request fail or a ring be declared corrupt; it cannot make the reader
//! read out of bounds, panic or act on a record it did not validate.
//!
//! - [`region`]: the layout, creation (control) and attachment (dataplane),
//!   the per-worker counters.
//! - [`ring`]: the SPSC index protocol (checked by a loom model).
//! - [`ends`]: the typed ring ends: a worker's end pushes
//!   [`AskRecord`](relay_proto::channel::record::AskRecord)s and pops
//!   [`AnswerRecord`](relay_proto::channel::record::AnswerRecord)s, control's
//!   the reverse; a record of the wrong direction does not compile.
//! - [`doorbell`]: eventfd doorbells.
//! - [`fdpass`]: SCM_RIGHTS descriptor passing.
//! - [`attach`]: the attach handshake's frames over the Unix socket.
//!
//! Unsafe code lives in `mapping` (mmap and the word-wise slot copies),
//! `memfd` (memfd creation and seals), [`doorbell`] and [`fdpass`]; the
//! other modules forbid it.
//!
//! Non-goals: more than one producer or consumer per ring, and records
//! larger than a slot.

pub mod attach;
pub mod doorbell;
pub mod ends;
pub mod fdpass;
mod mapping;
mod memfd;
pub mod region;
pub mod ring;
