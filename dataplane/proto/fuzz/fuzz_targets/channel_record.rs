//! Shared-memory channel records: any slot content decodes or is refused
//! without panicking, and accepted records survive an encode/decode round
//! trip unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_proto::channel::RECORD_SIZE;
use relay_proto::channel::record::Record;

fuzz_target!(|data: &[u8]| {
    let mut slot = [0u8; RECORD_SIZE];
    let n = data.len().min(RECORD_SIZE);
    slot[..n].copy_from_slice(&data[..n]);
    if let Ok(record) = Record::decode(&slot) {
        let mut again = [0u8; RECORD_SIZE];
        record.encode(&mut again).expect("a decoded record re-encodes");
        assert_eq!(Record::decode(&again).expect("re-encoded record decodes"), record);
    }
});
