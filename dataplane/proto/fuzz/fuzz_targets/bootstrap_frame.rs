//! The frames read from the channel socket (the attach handshake, and
//! control's TLS updates after it): arbitrary bytes are refused or parsed,
//! never a panic or an unbounded allocation.
#![no_main]

use std::io::Write;
use std::os::unix::net::UnixStream;

use libfuzzer_sys::fuzz_target;
use relay_proto::channel::bootstrap::{self, Bootstrap, ControlUpdate, Hello};

fuzz_target!(|data: &[u8]| {
    if data.len() > 70_000 {
        return;
    }
    let (a, b) = UnixStream::pair().expect("socketpair");
    (&a).write_all(data).expect("write");
    drop(a);
    let _ = bootstrap::recv::<Hello>(&b);
    let (a, b) = UnixStream::pair().expect("socketpair");
    (&a).write_all(data).expect("write");
    drop(a);
    if let Ok((boot, _)) = bootstrap::recv::<Bootstrap>(&b) {
        let _ = boot.tls.validate();
    }
    let (a, b) = UnixStream::pair().expect("socketpair");
    (&a).write_all(data).expect("write");
    drop(a);
    if let Ok((ControlUpdate::Tls(material), _)) = bootstrap::recv::<ControlUpdate>(&b) {
        let _ = material.validate();
    }
});
