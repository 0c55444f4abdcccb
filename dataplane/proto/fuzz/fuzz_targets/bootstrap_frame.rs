//! The frames read from the channel socket (the attach handshake, and
//! control's TLS updates after it): arbitrary bytes are refused or parsed,
//! never a panic or an unbounded allocation. The bytes go through the same
//! two steps `relay_channel::attach::recv` takes: the length prefix (checked
//! before anything is allocated), then the body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_proto::channel::bootstrap::{self, Bootstrap, ControlUpdate, FRAME_PREFIX, Hello};
use serde::de::DeserializeOwned;

/// One frame from the front of `data`, as the socket reader takes it.
fn frame<T: DeserializeOwned>(data: &[u8]) -> Option<T> {
    let prefix: [u8; FRAME_PREFIX] = data.get(..FRAME_PREFIX)?.try_into().ok()?;
    let len = bootstrap::frame_len(prefix).ok()?;
    let body = data.get(FRAME_PREFIX..FRAME_PREFIX + len)?;
    bootstrap::decode_body(body).ok()
}

fuzz_target!(|data: &[u8]| {
    if data.len() > 70_000 {
        return;
    }
    let _ = frame::<Hello>(data);
    if let Some(boot) = frame::<Bootstrap>(data) {
        let _ = boot.tls.validate();
    }
    if let Some(ControlUpdate::Tls(material)) = frame::<ControlUpdate>(data) {
        let _ = material.validate();
    }
});
