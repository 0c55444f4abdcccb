//! quiche configuration for the relay's QUIC + HTTP/3 endpoint.

use std::sync::Arc;

use relay_proto::channel::bootstrap::{Bootstrap, TlsMaterial};

use crate::tickets::TicketKeyring;

/// The relay's QUIC connections: quiche with the relay's buffers
/// (DATAGRAM frames recycled per thread, [`crate::dgram_buf`]).
pub type Connection = quiche::Connection<crate::dgram_buf::RelayBufs>;

/// Largest UDP payload the relay sends (fits a 1500-byte MTU path).
pub const MAX_SEND_UDP_PAYLOAD: usize = 1350;
/// Largest UDP payload the relay receives.
pub const MAX_RECV_UDP_PAYLOAD: usize = 65_527;
/// QUIC DATAGRAM frames queued per connection each way.
pub const DGRAM_QUEUE: usize = 4096;
/// Paths (client addresses) a connection may use over its life; also our
/// active_connection_id_limit transport parameter.
pub const MAX_PATHS: u64 = 16;

/// Why the QUIC configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum QuicConfigError {
    /// The TLS context (certificate chain, keyless signing).
    #[error(transparent)]
    Tls(#[from] crate::keyless::TlsContextError),
    /// quiche refused a setting.
    #[error("QUIC configuration: {0}")]
    Quiche(#[from] quiche::Error),
}

/// Builds the transport configuration: TLS with control's certificate chain
/// (`tls`), keyless signing (the private key stays in control) and session
/// tickets sealed with control's keys (`tickets`), ALPN h3,
/// DATAGRAM support (which advertises max_datagram_frame_size, RFC 9221, as
/// RFC 9297 section 2.1.1 requires for SETTINGS_H3_DATAGRAM), and flow
/// control sized for tunnels.
pub fn transport_config(
    b: &Bootstrap,
    tls: &TlsMaterial,
    tickets: &Arc<TicketKeyring>,
) -> Result<quiche::Config, QuicConfigError> {
    let tls = crate::keyless::ssl_context(tls, tickets)?;
    let mut c = quiche::Config::with_boring_ssl_ctx_builder(quiche::PROTOCOL_VERSION, tls)?;
    c.set_application_protos(quiche::h3::APPLICATION_PROTOCOL)?;
    c.set_max_idle_timeout(b.quic_idle_timeout_ms);
    c.set_max_recv_udp_payload_size(MAX_RECV_UDP_PAYLOAD);
    c.set_max_send_udp_payload_size(MAX_SEND_UDP_PAYLOAD);
    c.set_initial_max_data(32 << 20);
    c.set_initial_max_stream_data_bidi_local(1 << 20);
    c.set_initial_max_stream_data_bidi_remote(1 << 20);
    c.set_initial_max_stream_data_uni(1 << 20);
    // Tunnels plus headroom for refused requests the client has not yet
    // seen closed; quiche credits streams back as they complete.
    // WebTransport sessions carry the streams their applications open
    // (bidirectional ones count against the same limit).
    let webtransport = b.protocols.contains(&relay_proto::channel::bootstrap::Protocol::Webtransport);
    let session_streams = if webtransport { WEBTRANSPORT_STREAMS } else { 0 };
    c.set_initial_max_streams_bidi(u64::from(b.max_tunnels_per_connection) + 16 + session_streams);
    c.set_initial_max_streams_uni(16 + session_streams);
    c.set_disable_active_migration(true);
    // quiche keeps at most this many paths per connection and never frees
    // a validated one it has left (the old path keeps the reused DCID), so
    // this bounds how many NAT rebindings a connection survives: 15.
    c.set_active_connection_id_limit(MAX_PATHS);
    c.enable_dgram(true, DGRAM_QUEUE, DGRAM_QUEUE);
    // RESET_STREAM_AT accepted (the vendored quiche's patch): a client's
    // reset keeps the bytes before its reliable size, such as a
    // WebTransport stream's header (draft-ietf-webtrans-http3-16 sections
    // 3.1 and 4.4).
    c.enable_reset_stream_at(true);
    Ok(c)
}

/// Streams of WebTransport sessions a client may have open at once per
/// connection, each way (on top of the tunnels' own).
pub const WEBTRANSPORT_STREAMS: u64 = 256;

/// Builds the HTTP/3 configuration: SETTINGS_ENABLE_CONNECT_PROTOCOL=1
/// (RFC 9220) and a bounded field section size. quiche adds
/// SETTINGS_H3_DATAGRAM=1 itself because DATAGRAM is enabled. With
/// `webtransport` (WebTransport is served), the WebTransport SETTINGS
/// (draft-ietf-webtrans-http3 section 3.1, and the older drafts' that
/// deployed clients look for) and quiche's claiming of WebTransport
/// streams.
pub fn h3_config(webtransport: bool) -> Result<quiche::h3::Config, quiche::h3::Error> {
    let mut c = quiche::h3::Config::new()?;
    c.enable_extended_connect(true);
    c.set_max_field_section_size(16 * 1024);
    c.set_qpack_max_table_capacity(0);
    c.set_qpack_blocked_streams(0);
    if webtransport {
        c.enable_webtransport(true);
        c.set_additional_settings(crate::tunnel::webtransport::settings())?;
    }
    Ok(c)
}
