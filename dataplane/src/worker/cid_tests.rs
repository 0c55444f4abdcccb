//! Connection IDs on the worker core: every ID the relay hands out
//! (the handshake's and NEW_CONNECTION_ID spares) routes to this host and
//! worker with a QUIC-LB load balancer's decoder (draft-ietf-quic-load-
//! balancers-21), also across a configuration rotation, and clients keep
//! working on the new IDs.

use std::sync::Arc;

use relay_channel::region::Counter;
use relay_proto::channel::bootstrap::CidSettings;
use relay_proto::cid::lb::LbDecoder;
use relay_proto::cid::{CidConfigs, Decoded, config_id_of};

use super::harness::{Harness, bootstrap};
use crate::cids::CidShared;

const HOST: [u8; 2] = [0x12, 0x34];

fn settings(config_id: u8, key: u8) -> CidSettings {
    // 2-byte server ID + 14-byte nonce (worker byte + 13 random): the
    // single-pass AES-128-ECB case.
    CidSettings { config_id, host_id: HOST.to_vec(), random_len: 13, key: Some([key; 16]) }
}

fn counter(h: &Harness, c: Counter) -> u64 {
    h.worker.ctx.link.counters().get(c)
}

/// A harness whose worker uses `settings`, and the shared configuration it
/// follows.
fn keyed_harness(s: &CidSettings) -> (Harness, Arc<CidShared>) {
    let mut b = bootstrap(1);
    b.cid_config_id = s.config_id;
    b.cid_server_id = s.host_id.clone();
    b.cid_nonce_len = s.random_len;
    b.cid_key = s.key;
    let mut h = Harness::new(b);
    let shared = Arc::new(CidShared::new(CidConfigs::new(s.layout().unwrap())));
    h.worker.set_cid_updates(shared.clone());
    (h, shared)
}

#[test]
fn every_connection_id_handed_out_routes_to_this_host_and_worker() {
    let s = settings(2, 0x61);
    let (mut h, _) = keyed_harness(&s);
    h.connect();
    h.run();
    let ids = h.worker.h3.source_ids();
    assert!(ids.len() >= 2, "the handshake's ID and at least one spare: {ids:?}");
    assert!(counter(&h, Counter::ConnectionIdsIssued) >= 1);
    assert!(h.client.quic.available_dcids() >= 1, "the client holds a spare");
    let lb = LbDecoder::new(*s.layout().unwrap().lb_config());
    for id in &ids {
        assert_eq!(config_id_of(id[0]), 2);
        assert_eq!(lb.server_id(id).map(|sid| sid.to_vec()), Ok(HOST.to_vec()), "{id:02x?}");
        assert_eq!(h.worker.ctx.settings.cids.decode(id), Decoded::Worker(0));
        // Encrypted: the host ID is not in the clear.
        assert_ne!(id[1..3], HOST, "{id:02x?}");
    }
}

#[test]
fn a_rotation_moves_every_connection_to_the_new_configuration_and_it_keeps_working() {
    let old = settings(0, 0x61);
    let (mut h, shared) = keyed_harness(&old);
    h.connect();
    h.run();
    let before = h.worker.h3.source_ids();
    // Same length: quiche parses a connection's short headers at the
    // length of its first connection ID.
    let new = CidSettings { config_id: 1, key: Some([0x62; 16]), ..old.clone() };
    shared.rotate(&new).unwrap();
    for _ in 0..5 {
        h.advance(std::time::Duration::from_millis(100));
        h.client.quic.send_ack_eliciting().unwrap();
        h.run();
    }
    let after = h.worker.h3.source_ids();
    assert!(!after.is_empty());
    assert!(
        after.iter().all(|id| config_id_of(id[0]) == 1),
        "every ID of the old configuration was retired (retire_prior_to): {after:02x?}"
    );
    assert!(before.iter().all(|id| !after.contains(id)));
    // A balancer that knows both configurations routes both to this host.
    let mut lb = LbDecoder::new(*old.layout().unwrap().lb_config());
    lb.insert(*new.layout().unwrap().lb_config());
    for id in before.iter().chain(&after) {
        assert_eq!(lb.server_id(id).map(|sid| sid.to_vec()), Ok(HOST.to_vec()));
    }
    // The client now talks to the new IDs: a tunnel still opens.
    let stream = h.client.connect_udp("127.0.0.1", 9);
    h.run();
    let ask = h.control.take_asks().remove(0);
    h.control.allow(&ask, 3, "127.0.0.1:9".parse().unwrap());
    h.run();
    assert_eq!(h.client.status(stream), Some(200));
    assert_eq!(config_id_of(h.client.quic.destination_id()[0]), 1, "the client switched to a new ID");
}

/// A harness that sends every new client a Retry, with `s` as its
/// connection IDs.
fn retrying_harness(s: &CidSettings) -> Harness {
    let mut b = bootstrap(1);
    b.retry_threshold = 0;
    b.cid_config_id = s.config_id;
    b.cid_server_id = s.host_id.clone();
    b.cid_nonce_len = s.random_len;
    b.cid_key = s.key;
    Harness::new(b)
}

#[test]
fn a_retried_handshake_completes_whatever_the_connection_id_lengths() {
    // After a Retry the transport parameters carry the client's original
    // ID and ours twice beside the stateless reset token (the harness
    // client's original ID is 16 bytes, quiche's default; clients may use
    // 20): all of it fits (the vendored quiche's 256-byte encoding buffer;
    // its own 128 bytes left the token out).
    let layouts = [
        CidSettings { config_id: 0, host_id: vec![], random_len: 14, key: None },
        settings(2, 0x61),
        CidSettings { config_id: 1, host_id: vec![0x0a], random_len: 14, key: Some([0x61; 16]) },
        CidSettings { config_id: 1, host_id: HOST.to_vec(), random_len: 16, key: Some([0x61; 16]) },
    ];
    for s in layouts {
        let len = s.layout().unwrap().lb_config().cid_len();
        let mut h = retrying_harness(&s);
        h.connect();
        assert!(counter(&h, Counter::RetriesSent) >= 1, "{len}-byte IDs: the client was retried");
        assert_eq!(
            counter(&h, Counter::HandshakesCompleted),
            1,
            "{len}-byte IDs: the retried handshake completes"
        );
        assert_eq!(h.client.quic.destination_id().len(), len);
        // RFC 9000 section 18.2: the handshake's connection ID has its
        // stateless reset token, the one derived for it (section 10.3.2).
        let token = h.client.quic.peer_transport_params().and_then(|p| p.stateless_reset_token);
        assert!(token.is_some(), "{len}-byte IDs: the retried handshake's ID has its reset token");
    }
}
