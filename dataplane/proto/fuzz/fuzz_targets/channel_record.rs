//! Shared-memory channel records: any slot content decodes or is refused
//! without panicking, in either direction, and accepted records survive an
//! encode/decode round trip unchanged. A slot holds a record of one
//! direction at most: what decodes as an ask is refused as an answer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_proto::channel::RECORD_SIZE;
use relay_proto::channel::record::{AnswerRecord, AskRecord, RecordError};

fuzz_target!(|data: &[u8]| {
    let mut slot = [0u8; RECORD_SIZE];
    let n = data.len().min(RECORD_SIZE);
    slot[..n].copy_from_slice(&data[..n]);
    let ask = AskRecord::decode(&slot);
    let answer = AnswerRecord::decode(&slot);
    if let Ok(record) = ask {
        assert!(matches!(answer, Err(RecordError::WrongDirection(_))));
        let mut again = [0u8; RECORD_SIZE];
        record.encode(&mut again).expect("a decoded record re-encodes");
        assert_eq!(AskRecord::decode(&again).expect("re-encoded record decodes"), record);
    } else if let Ok(record) = answer {
        assert!(matches!(ask, Err(RecordError::WrongDirection(_))));
        let mut again = [0u8; RECORD_SIZE];
        record.encode(&mut again).expect("a decoded record re-encodes");
        assert_eq!(AnswerRecord::decode(&again).expect("re-encoded record decodes"), record);
    }
});
