//! Three-way merge of run-time states (pure).
//!
//! A host whose run-time state differs from the last state it knows to be
//! in the store (`base`) has changes the fleet has not seen: made while the
//! store was unreachable (`on_store_failure = "open"`), or kept in its
//! `policy.json` from before it joined the fleet. They are merged into the
//! store's current state entry by entry: an entry this host changed (added,
//! removed or altered since `base`) takes this host's value, every other
//! entry the store's. So revocations made on either side during an outage
//! both survive, and a change made elsewhere is not undone by a host that
//! did not touch that entry.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use crate::auth::AuthState;
use crate::store::RuntimeState;

/// Merges one map: entries `local` changed since `base` win over `remote`.
fn merge_map<K: Ord + Clone, V: Clone + PartialEq>(
    base: &BTreeMap<K, V>,
    local: &BTreeMap<K, V>,
    remote: &BTreeMap<K, V>,
) -> BTreeMap<K, V> {
    let mut out = remote.clone();
    for key in base.keys().chain(local.keys()) {
        let (was, now) = (base.get(key), local.get(key));
        if was == now {
            continue;
        }
        match now {
            Some(v) => {
                out.insert(key.clone(), v.clone());
            }
            None => {
                out.remove(key);
            }
        }
    }
    out
}

/// The state with `local`'s changes since `base` applied to `remote`.
pub fn merge(base: &RuntimeState, local: &RuntimeState, remote: &RuntimeState) -> RuntimeState {
    RuntimeState {
        version: remote.version,
        auth: AuthState {
            static_tokens: merge_map(
                &base.auth.static_tokens,
                &local.auth.static_tokens,
                &remote.auth.static_tokens,
            ),
            revoked_subjects: merge_map(
                &base.auth.revoked_subjects,
                &local.auth.revoked_subjects,
                &remote.auth.revoked_subjects,
            ),
            revoked_tokens: merge_map(
                &base.auth.revoked_tokens,
                &local.auth.revoked_tokens,
                &remote.auth.revoked_tokens,
            ),
        },
        quota_overrides: merge_map(&base.quota_overrides, &local.quota_overrides, &remote.quota_overrides),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{AddedToken, RevokedSubject, TokenDigest};
    use crate::store::VERSION;

    fn state(subjects: &[&str], overrides: &[(&str, u64)]) -> RuntimeState {
        let mut s = RuntimeState { version: VERSION, ..Default::default() };
        for sub in subjects {
            s.auth.revoked_subjects.insert(sub.to_string(), RevokedSubject { revoked_unix: 1 });
        }
        for (k, v) in overrides {
            s.quota_overrides.insert(k.to_string(), *v);
        }
        s
    }

    #[test]
    fn both_sides_changes_survive() {
        let base = state(&["a", "b"], &[("per_identity.max_flows", 2)]);
        // Here: revoked c, lifted a. There: revoked d, changed a quota.
        let local = state(&["b", "c"], &[("per_identity.max_flows", 2)]);
        let remote = state(&["a", "b", "d"], &[("per_identity.max_flows", 5)]);
        let m = merge(&base, &local, &remote);
        assert_eq!(m.auth.revoked_subjects.keys().collect::<Vec<_>>(), ["b", "c", "d"]);
        assert_eq!(m.quota_overrides.get("per_identity.max_flows"), Some(&5), "untouched here: theirs");
    }

    #[test]
    fn no_local_change_is_the_remote_state() {
        let base = state(&["a"], &[]);
        let remote = state(&[], &[("per_client.max_flows", 1)]);
        assert_eq!(merge(&base, &base, &remote), remote);
        // A host that never synced (empty base) adds what it has.
        let mut local = state(&["x"], &[]);
        local.auth.static_tokens.insert(TokenDigest::of("t"), AddedToken { added_unix: 3 });
        let m = merge(&RuntimeState { version: VERSION, ..Default::default() }, &local, &remote);
        assert!(m.auth.revoked_subjects.contains_key("x"));
        assert_eq!(m.auth.static_tokens.len(), 1);
        assert_eq!(m.quota_overrides.len(), 1);
    }

    #[test]
    fn a_local_value_change_wins() {
        let base = state(&[], &[("per_identity.max_flows", 2)]);
        let local = state(&[], &[("per_identity.max_flows", 3)]);
        let remote = state(&[], &[("per_identity.max_flows", 4), ("per_client.burst", 1)]);
        let m = merge(&base, &local, &remote);
        assert_eq!(m.quota_overrides.get("per_identity.max_flows"), Some(&3));
        assert_eq!(m.quota_overrides.get("per_client.burst"), Some(&1));
    }
}
