//! connect-ip (RFC 9484): proxying IP in HTTP.
//!
//! Pure, sans-IO pieces the dataplane drives:
//!
//! - [`capsule`]: the ADDRESS_ASSIGN, ADDRESS_REQUEST and ROUTE_ADVERTISEMENT
//!   capsules (section 4.7) and the [`capsule::IpPrefix`] type.
//! - [`packet`]: the IP packet checks a tunnel endpoint acting as a router
//!   needs (section 7): header parsing with the IPv6 extension header walk
//!   (section 4.8), TTL / hop limit decrement, ICMP error generation
//!   (section 7.2.1).
//! - [`echo`]: ICMPv6 Echo on the tunnel link, for the IPv6 link MTU
//!   check (section 7.2).
//! - [`offload`]: the virtio-net header of TUN devices with offloads, GSO
//!   segmentation of what they read and TCP coalescing of what is written.
//! - [`scope`]: the `target` and `ipproto` request variables and the scope
//!   they define (section 4.6).
//!
//! The URI template and request classification live with their connect-udp
//! counterparts: [`crate::template::IpUriTemplate`] and
//! [`crate::request::classify_connect_ip`].
#![forbid(unsafe_code)]

pub mod capsule;
pub mod echo;
pub mod offload;
pub mod packet;
pub mod scope;
