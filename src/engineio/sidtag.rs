//! Tagged sids: the route of an Engine.IO session carried in its sid, so that any
//! corral node, or a restarted corral, sends every request of the session to its
//! worker without having seen the handshake.
//!
//! A worker's sid `S` reaches the client as `S.T`, where `T` is 22 base64url
//! characters of 16 bytes: the node's reference (4), the worker's reference (4) and
//! a MAC (8, HMAC-SHA-256 under the cluster key) over both and `S`, so a client can
//! neither pick a worker by writing a tag nor move a tag to another sid. The
//! references are hashes of the node's name and of the worker's configured identity
//! (its address, or its supervisor id), never of start order or a free port, so every
//! node and every restart computes the same tag. `.` is outside the sid alphabets of
//! python-engineio and Node's engine.io (base64url), and no sid length is assumed.
//!
//! This module only makes and reads tags; the proxy rewrites handshakes and
//! queries, the router and the pool route.

use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// What separates a worker's sid from its tag.
pub const SEPARATOR: char = '.';
/// Length of a tag as text.
pub const TAG_LEN: usize = 22;

pub use crate::workers::pool::Ref;

/// The reference of a node, from its name.
pub fn node_ref(name: &str) -> Ref {
    crate::workers::pool::stable_ref("corral-node", name)
}

#[cfg(test)]
/// The reference of a worker, from its configured identity (as the pool makes it).
pub fn worker_ref(identity: &str) -> Ref {
    crate::workers::pool::stable_ref("corral-worker", identity)
}

/// Makes tags under one key, and checks them under it or any of the keys it still
/// accepts (the keys of a rotation: every node accepts the new key before any
/// signs with it, and the old one for a while after).
#[derive(Clone)]
pub struct Tagger {
    key: Vec<u8>,
    accepted: Vec<Vec<u8>>,
    /// The key a reload replaced, and until when it is accepted.
    previous: Option<(Vec<u8>, std::time::Instant)>,
}

impl std::fmt::Debug for Tagger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tagger { key: <hidden> }")
    }
}

/// Where a tagged sid says its session lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub node: Ref,
    pub worker: Ref,
}

/// A sid as a request carries it.
#[derive(Debug, PartialEq, Eq)]
pub enum Sid<'a> {
    /// No tag: routed by the session table, as without tags.
    Plain(&'a str),
    /// A tag that checks out: the worker's own sid and where it lives.
    Tagged { raw: &'a str, route: Route },
    /// A tag that does not check out (forged, cut short, or from another key).
    Bad,
}

impl Tagger {
    pub fn new(key: &[u8]) -> Tagger {
        Tagger {
            key: key.to_vec(),
            accepted: Vec::new(),
            previous: None,
        }
    }

    /// Takes over from `old`: its signing key, if another, is accepted for
    /// `period` more (its own previous key for what is left of its period).
    pub fn after(mut self, old: &Tagger, period: std::time::Duration) -> Tagger {
        self.previous = match old.key != self.key {
            true => Some((old.key.clone(), std::time::Instant::now() + period)),
            false => old.previous.clone(),
        };
        self
    }

    /// The signing key.
    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// Also accepts tags and hop proofs made under `keys` (never signs with them).
    pub fn accepting(mut self, keys: impl IntoIterator<Item = Vec<u8>>) -> Tagger {
        for k in keys {
            if k != self.key && !self.accepted.contains(&k) {
                self.accepted.push(k);
            }
        }
        self
    }

    /// The signing key, then the others accepted, then the replaced one while its
    /// period lasts (the clock is read only when the others did not fit).
    fn keys(&self) -> impl Iterator<Item = &[u8]> {
        let previous = self
            .previous
            .iter()
            .filter(|(_, until)| std::time::Instant::now() < *until)
            .map(|(k, _)| k.as_slice());
        std::iter::once(self.key.as_slice())
            .chain(self.accepted.iter().map(Vec::as_slice))
            .chain(previous)
    }

    fn mac(&self, route: Route, sid: &str) -> [u8; 8] {
        mac_under(&self.key, route, sid)
    }

    /// `sid` with its tag: `sid.TAG`.
    pub fn tag(&self, sid: &str, route: Route) -> String {
        let mut bytes = [0u8; 16];
        bytes[..4].copy_from_slice(&route.node);
        bytes[4..8].copy_from_slice(&route.worker);
        bytes[8..].copy_from_slice(&self.mac(route, sid));
        let tag = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        format!("{sid}{SEPARATOR}{tag}")
    }

    /// Reads a sid from a request.
    pub fn read<'a>(&self, sid: &'a str) -> Sid<'a> {
        let Some((raw, tag)) = sid.rsplit_once(SEPARATOR) else {
            return Sid::Plain(sid);
        };
        if raw.is_empty() || tag.len() != TAG_LEN {
            return Sid::Bad;
        }
        let Ok(bytes) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(tag) else {
            return Sid::Bad;
        };
        if bytes.len() != 16 {
            return Sid::Bad;
        }
        let mut node = [0u8; 4];
        let mut worker = [0u8; 4];
        node.copy_from_slice(&bytes[..4]);
        worker.copy_from_slice(&bytes[4..8]);
        let route = Route { node, worker };
        use subtle::ConstantTimeEq;
        let fits = |key: &[u8]| bool::from(mac_under(key, route, raw).ct_eq(&bytes[8..16]));
        match self.keys().any(fits) {
            true => Sid::Tagged { raw, route },
            false => Sid::Bad,
        }
    }
}

/// HMAC-SHA-256 under `key` of `parts`, one after the other.
fn hmac_under(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC accepts a key of any length.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

fn mac_under(key: &[u8], route: Route, sid: &str) -> [u8; 8] {
    let full = hmac_under(key, &[&route.node, &route.worker, sid.as_bytes()]);
    let mut out = [0u8; 8];
    out.copy_from_slice(&full[..8]);
    out
}

fn hop_mac_under(key: &[u8], from: &str) -> String {
    let full = hmac_under(key, &[b"corral-hop\0", from.as_bytes()]);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&full[..12])
}

/// The header that marks a request one node sent to another (a hop): it is sent
/// on once at most, and only a configured node with the key can make one.
pub const HOP_HEADER: http::HeaderName = http::HeaderName::from_static("x-corral-hop");

impl Tagger {
    /// The hop header's value for requests this node (`from`) sends to another.
    pub fn hop_proof(&self, from: &str) -> String {
        format!("{from} {}", hop_mac_under(&self.key, from))
    }

    /// The node a hop header says sent the request, if its proof checks out.
    pub fn check_hop<'a>(&self, value: &'a str) -> Option<&'a str> {
        let (from, mac) = value.split_once(' ')?;
        use subtle::ConstantTimeEq;
        let fits =
            |key: &[u8]| bool::from(hop_mac_under(key, from).as_bytes().ct_eq(mac.as_bytes()));
        self.keys().any(fits).then_some(from)
    }
}

/// Replaces the first `sid=` value of a query (as python-engineio reads the first)
/// with `raw`, so that the worker sees its own sid.
pub fn strip_query(query: &str, raw: &str) -> Option<String> {
    let mut out = String::with_capacity(query.len());
    let mut done = false;
    for (i, pair) in query.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        match pair.split_once('=') {
            Some((key, value)) if !done && !value.is_empty() && decoded_is_sid(key) => {
                out.push_str(key);
                out.push('=');
                out.push_str(raw);
                done = true;
            }
            _ => out.push_str(pair),
        }
    }
    done.then_some(out)
}

fn decoded_is_sid(key: &str) -> bool {
    form_urlencoded::parse(format!("{key}=").as_bytes())
        .next()
        .is_some_and(|(k, _)| k == "sid")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route() -> Route {
        Route {
            node: node_ref("a"),
            worker: worker_ref("addr:127.0.0.1:5000"),
        }
    }

    #[test]
    fn tags_round_trip_and_forgeries_fail() {
        let t = Tagger::new(b"secret");
        let tagged = t.tag("AbC-d_12", route());
        assert_eq!(tagged.len(), "AbC-d_12".len() + 1 + TAG_LEN);
        assert_eq!(
            t.read(&tagged),
            Sid::Tagged {
                raw: "AbC-d_12",
                route: route()
            }
        );
        // Another key, another sid, a changed worker, a cut tag: all refused.
        assert_eq!(Tagger::new(b"other").read(&tagged), Sid::Bad);
        let moved = format!("XYZ{}", &tagged["AbC-d_12".len()..]);
        assert_eq!(t.read(&moved), Sid::Bad);
        let forged = t.tag(
            "AbC-d_12",
            Route {
                node: route().node,
                worker: worker_ref("addr:127.0.0.1:5001"),
            },
        );
        let spliced = format!(
            "{}{}",
            &forged[..forged.len() - 11],
            &tagged[tagged.len() - 11..]
        );
        assert_eq!(t.read(&spliced), Sid::Bad);
        assert_eq!(t.read(&tagged[..tagged.len() - 1]), Sid::Bad);
        assert_eq!(
            t.read("plain_sid-20chars___"),
            Sid::Plain("plain_sid-20chars___")
        );
        assert_eq!(t.read(".x"), Sid::Bad);
    }

    #[test]
    fn a_sid_with_the_separator_and_any_length() {
        let t = Tagger::new(b"k");
        for sid in ["a.b", "x", &"y".repeat(32), &"z".repeat(20)] {
            let tagged = t.tag(sid, route());
            assert_eq!(
                t.read(&tagged),
                Sid::Tagged {
                    raw: sid,
                    route: route()
                }
            );
        }
    }

    #[test]
    fn hop_proofs_need_the_key() {
        let t = Tagger::new(b"shared-key");
        let proof = t.hop_proof("a");
        assert_eq!(t.check_hop(&proof), Some("a"));
        assert_eq!(Tagger::new(b"other-key").check_hop(&proof), None);
        assert_eq!(t.check_hop(&proof.replacen('a', "b", 1)), None);
        assert_eq!(t.check_hop("a"), None);
    }

    #[test]
    fn accepted_keys_check_but_never_sign() {
        let old = Tagger::new(b"old-key");
        let new = Tagger::new(b"new-key").accepting([b"old-key".to_vec()]);
        let by_old = old.tag("s1", route());
        assert_eq!(
            new.read(&by_old),
            Sid::Tagged {
                raw: "s1",
                route: route()
            }
        );
        assert_eq!(new.check_hop(&old.hop_proof("a")), Some("a"));
        // New tags and proofs are the new key's: the old key alone refuses them.
        let by_new = new.tag("s1", route());
        assert_ne!(by_new, by_old);
        assert_eq!(old.read(&by_new), Sid::Bad);
        assert_eq!(old.check_hop(&new.hop_proof("a")), None);
        assert_eq!(Tagger::new(b"new-key").read(&by_old), Sid::Bad);
    }

    #[test]
    fn a_replaced_key_is_accepted_for_its_period_only() {
        let old = Tagger::new(b"old-key");
        let by_old = old.tag("s1", route());
        let kept = Tagger::new(b"new-key").after(&old, std::time::Duration::from_secs(60));
        assert!(matches!(kept.read(&by_old), Sid::Tagged { .. }));
        assert_eq!(kept.check_hop(&old.hop_proof("a")), Some("a"));
        let over = Tagger::new(b"new-key").after(&old, std::time::Duration::ZERO);
        assert_eq!(over.read(&by_old), Sid::Bad);
        // The same key again keeps the previous one's period.
        let again = Tagger::new(b"new-key").after(&kept, std::time::Duration::ZERO);
        assert!(matches!(again.read(&by_old), Sid::Tagged { .. }));
    }

    #[test]
    fn references_are_stable() {
        assert_eq!(node_ref("a"), node_ref("a"));
        assert_ne!(node_ref("a"), node_ref("b"));
        assert_ne!(worker_ref("worker:0"), worker_ref("worker:1"));
    }

    #[test]
    fn queries_lose_only_the_tag() {
        assert_eq!(
            strip_query("EIO=4&transport=polling&sid=abc.TAG&t=1", "abc").as_deref(),
            Some("EIO=4&transport=polling&sid=abc&t=1")
        );
        assert_eq!(
            strip_query("%73id=abc.TAG&sid=other", "abc").as_deref(),
            Some("%73id=abc&sid=other")
        );
        assert_eq!(strip_query("EIO=4", "abc"), None);
    }
}
