//! Backpressure towards targets: a datagram tunnel whose path to the
//! client is backlogged stops reading its sockets, and reads them again
//! once the backlog is low (docs/ARCHITECTURE.md, "Backpressure, down").
//! What the targets send meanwhile waits in the sockets' buffers, and the
//! kernel drops the excess at no cost to the worker.
#![forbid(unsafe_code)]

use relay_channel::region::Counter;

use super::Backlog;
use crate::context::Ctx;
use crate::io::TargetKey;

/// Whether a tunnel's sockets are being read.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReadPause {
    paused: bool,
}

impl ReadPause {
    /// Whether the sockets are paused.
    pub fn is_paused(self) -> bool {
        self.paused
    }

    /// Pauses `endpoints` while `backlog` is high; returns whether this
    /// paused them (they were being read). Counted once per pause.
    pub fn pause_if_backlogged(
        &mut self,
        backlog: Backlog,
        endpoints: impl IntoIterator<Item = TargetKey>,
        ctx: &mut Ctx,
    ) -> bool {
        if self.paused || backlog != Backlog::High {
            return false;
        }
        self.paused = true;
        ctx.count(Counter::TargetReadsPaused, 1);
        for key in endpoints {
            ctx.pause_endpoint(key);
        }
        true
    }

    /// Reads `endpoints` again once `backlog` is low; returns whether they
    /// are still paused.
    pub fn resume_if_drained(
        &mut self,
        backlog: Backlog,
        endpoints: impl IntoIterator<Item = TargetKey>,
        ctx: &mut Ctx,
    ) -> bool {
        if self.paused && backlog == Backlog::Low {
            self.paused = false;
            for key in endpoints {
                ctx.resume_endpoint(key);
            }
        }
        self.paused
    }
}
