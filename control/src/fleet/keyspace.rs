//! The names of the fleet's keys and channel in the store: everything
//! under `<key_prefix>:<fleet name>:`.
#![forbid(unsafe_code)]

/// Key names of one fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyspace {
    base: String,
}

impl Keyspace {
    /// The keys of fleet `fleet` under `prefix` (both checked names).
    pub fn new(prefix: &str, fleet: &str) -> Self {
        Self { base: format!("{prefix}:{fleet}") }
    }

    /// `<prefix>:<fleet>`, what every key starts with.
    pub fn prefix(&self) -> &str {
        &self.base
    }

    fn key(&self, leaf: &str) -> String {
        format!("{}:{leaf}", self.base)
    }

    /// The signed run-time state.
    pub fn state(&self) -> String {
        self.key("state")
    }

    /// The state's version as a plain number (what the poll reads; a hint
    /// only, the signed state carries the real one).
    pub fn state_version(&self) -> String {
        self.key("state_version")
    }

    /// The sealed session ticket keys.
    pub fn tickets(&self) -> String {
        self.key("tickets")
    }

    /// The ticket key generation as a plain number (a hint, like
    /// [`Keyspace::state_version`]).
    pub fn tickets_generation(&self) -> String {
        self.key("tickets_generation")
    }

    /// The ticket key rotation lease (holder's host name, with a TTL).
    pub fn tickets_lease(&self) -> String {
        self.key("tickets_lease")
    }

    /// The set of host names that have sent heartbeats.
    pub fn hosts(&self) -> String {
        self.key("hosts")
    }

    /// One host's heartbeat (expires unless renewed).
    pub fn host(&self, host: &str) -> String {
        self.key(&format!("host:{host}"))
    }

    /// The channel changes are announced on.
    pub fn events(&self) -> String {
        self.key("events")
    }
}

/// An announcement on the events channel: only a hint to read the store
/// now (anyone who can publish can send one; what is read is verified).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The run-time state has this version.
    State(u64),
    /// The ticket keys have this generation.
    Tickets(u64),
}

impl Event {
    /// The message text.
    pub fn encode(self) -> String {
        match self {
            Event::State(v) => format!("state {v}"),
            Event::Tickets(g) => format!("tickets {g}"),
        }
    }

    /// Parses a message (`None`: not one of ours; re-read everything).
    pub fn parse(text: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(text).ok()?;
        let (kind, n) = text.split_once(' ')?;
        let n: u64 = n.parse().ok()?;
        match kind {
            "state" => Some(Event::State(n)),
            "tickets" => Some(Event::Tickets(n)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_events() {
        let k = Keyspace::new("masque", "eu");
        assert_eq!(k.state(), "masque:eu:state");
        assert_eq!(k.host("relay-1"), "masque:eu:host:relay-1");
        assert_eq!(k.events(), "masque:eu:events");
        for e in [Event::State(7), Event::Tickets(0)] {
            assert_eq!(Event::parse(e.encode().as_bytes()), Some(e));
        }
        for bad in [&b"state"[..], b"state x", b"other 1", b"", &[0xff, 0x20, 0x31]] {
            assert_eq!(Event::parse(bad), None);
        }
    }
}
