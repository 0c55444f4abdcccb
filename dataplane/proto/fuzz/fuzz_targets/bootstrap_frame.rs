//! The attach handshake frames read from the channel socket: arbitrary bytes
//! are refused or parsed, never a panic or an unbounded allocation.
#![no_main]

use std::io::Write;
use std::os::unix::net::UnixStream;

use libfuzzer_sys::fuzz_target;
use relay_proto::channel::bootstrap::{self, Bootstrap, Hello};

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
    let _ = bootstrap::recv::<Bootstrap>(&b);
});
