//! Sans-IO protocol core of the MASQUE relay.
//!
//! Everything here is pure: no sockets, no clocks, no threads. The dataplane
//! and the bench clients drive these types and move the bytes.
//!
//! - [`varint`], [`datagram`], [`capsule`]: HTTP Datagrams and the Capsule
//!   Protocol (RFC 9297) and the connect-udp payload format (RFC 9298).
//! - [`template`], [`target`], [`request`]: request validation (RFC 9114,
//!   RFC 9220) and connect-udp request classification (RFC 9298).
//! - [`ip`]: connect-ip (RFC 9484): its capsules, IP packet handling and
//!   request scope; its URI template and request classification sit in
//!   [`template`] and [`request`] beside connect-udp's.
//! - [`bind`]: bound UDP (draft-ietf-masque-connect-udp-listen-13): its
//!   capsules, uncompressed payload, header fields and the proxy's context
//!   table; its request classification sits in [`request`].
//! - [`http1`]: HTTP/1.1 request heads for the TCP front (RFC 9112): parsing,
//!   body framing, and classification into CONNECT, the connect-udp /
//!   connect-ip / WebSocket Upgrade (RFC 9298, RFC 9484, RFC 6455) and the
//!   h2c Upgrade (RFC 7540).
//! - [`websocket`]: WebSocket's opening handshake on both sides of the
//!   relay (RFC 6455 section 4, RFC 8441, RFC 9220); frames are relayed
//!   unparsed.
//! - [`h2c`]: cleartext HTTP/2 for the TCP front: preface sniffing,
//!   HTTP2-Settings, and the h2c Upgrade's frame shims.
//! - [`proxy_status`]: Proxy-Status (RFC 9209).
//! - [`privacy_pass`], [`base64url`]: Privacy Pass encodings (RFC 9577,
//!   RFC 9578) that control parses from `Proxy-Authorization`.
//! - [`cid`]: server connection IDs in the QUIC-LB format
//!   (draft-ietf-quic-load-balancers-21), plaintext or encrypted, naming
//!   the host and the owning worker; config rotation, the unroutable
//!   fallback and a load balancer's decoder.
//! - [`channel`]: what dataplane and control say over their shared-memory
//!   channel: the record codecs and the attach handshake's messages (the
//!   memory, rings and sockets themselves are `relay-channel`'s).
#![forbid(unsafe_code)]

pub mod base64url;
pub mod bind;
pub mod capsule;
pub mod channel;
pub mod cid;
pub mod datagram;
pub mod h2c;
pub mod http1;
pub mod ip;
pub mod privacy_pass;
pub mod proxy_status;
pub mod request;
pub mod target;
pub mod template;
pub mod varint;
pub mod websocket;
