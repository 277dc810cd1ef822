//! The key that authenticates the ranks of a run to each other, and the tags of the handshake
//! ([`crate::TcpGroup::connect`]): HMAC-SHA256 over both sides' random challenges, so neither a
//! stranger nor a recording of an earlier handshake gets a connection accepted, and a stranger
//! learns nothing about the group (its id, world or ranks) before it has proved the key.

use hmac::{Hmac, Mac};
use rand::rngs::OsRng;
use rand::TryRngCore;
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Bytes of a challenge and of a tag.
pub(crate) const NONCE: usize = 32;
pub(crate) const TAG: usize = 32;

/// What the key of a run's collectives is derived from the run token with (the HMAC message).
/// Versioned so that a future handshake can derive an unrelated key from the same token.
const KEY_CONTEXT: &[u8] = b"rlhf collective v1";
/// Labels of the two tags: the acceptor's and the connector's tags over the same challenges
/// differ, so one side's tag can never be replayed as the other's (a stranger cannot reflect
/// the acceptor's answer back to it).
const ACCEPTOR: &[u8] = b"rlhf-comm v2 acceptor";
const CONNECTOR: &[u8] = b"rlhf-comm v2 connector";

/// The secret every rank of a run's groups shares, 32 bytes. `Debug` prints a redaction.
#[derive(Clone, PartialEq, Eq)]
pub struct CollectiveKey([u8; 32]);

impl std::fmt::Debug for CollectiveKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CollectiveKey(<redacted>)")
    }
}

impl CollectiveKey {
    /// The key of the run whose secret token is `token`: HMAC-SHA256(token, "rlhf collective v1").
    /// A separate key rather than the token itself, so that the collectives never handle the
    /// secret the gRPC services check.
    pub fn from_run_token(token: &[u8]) -> CollectiveKey {
        CollectiveKey(mac(token, &[KEY_CONTEXT]))
    }

    pub(crate) fn acceptor_tag(&self, theirs: &[u8; NONCE], ours: &[u8; NONCE]) -> [u8; TAG] {
        mac(&self.0, &[ACCEPTOR, theirs, ours])
    }

    pub(crate) fn connector_tag(
        &self,
        ours: &[u8; NONCE],
        theirs: &[u8; NONCE],
        fields: &[u8],
    ) -> [u8; TAG] {
        mac(&self.0, &[CONNECTOR, ours, theirs, fields])
    }

    /// Whether `tag` is the acceptor's tag over the challenges (compared in constant time).
    pub(crate) fn check_acceptor(&self, nc: &[u8; NONCE], na: &[u8; NONCE], tag: &[u8]) -> bool {
        verify(&self.0, &[ACCEPTOR, nc, na], tag)
    }

    /// Whether `tag` is the connector's tag over the challenges and its fields.
    pub(crate) fn check_connector(
        &self,
        nc: &[u8; NONCE],
        na: &[u8; NONCE],
        fields: &[u8],
        tag: &[u8],
    ) -> bool {
        verify(&self.0, &[CONNECTOR, nc, na, fields], tag)
    }
}

/// A fresh challenge from the OS random source.
pub(crate) fn nonce() -> std::io::Result<[u8; NONCE]> {
    let mut n = [0u8; NONCE];
    OsRng
        .try_fill_bytes(&mut n)
        .map_err(|e| std::io::Error::other(format!("OS random source: {e}")))?;
    Ok(n)
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> HmacSha256 {
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    let mut m = <HmacSha256 as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of every length"));
    for p in parts {
        // Length-prefixed so that no two different part lists hash the same bytes.
        m.update(&(p.len() as u64).to_le_bytes());
        m.update(p);
    }
    m
}

fn mac(key: &[u8], parts: &[&[u8]]) -> [u8; TAG] {
    hmac(key, parts).finalize().into_bytes().into()
}

fn verify(key: &[u8], parts: &[&[u8]], tag: &[u8]) -> bool {
    hmac(key, parts).verify_slice(tag).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_hmac_of_the_token_and_tags_do_not_cross() {
        // RFC 4231-style check that the derivation is plain HMAC-SHA256(token, context).
        let k = CollectiveKey::from_run_token(b"token");
        let mut m = <HmacSha256 as Mac>::new_from_slice(b"token").unwrap();
        m.update(&(KEY_CONTEXT.len() as u64).to_le_bytes());
        m.update(KEY_CONTEXT);
        assert_eq!(k.0, <[u8; 32]>::from(m.finalize().into_bytes()));
        assert_ne!(k, CollectiveKey::from_run_token(b"other"));
        assert_eq!(format!("{k:?}"), "CollectiveKey(<redacted>)");
        let (a, b) = (nonce().unwrap(), nonce().unwrap());
        assert_ne!(a, b);
        let t = k.acceptor_tag(&a, &b);
        assert!(k.check_acceptor(&a, &b, &t));
        assert!(!k.check_acceptor(&b, &a, &t));
        assert!(
            !k.check_connector(&a, &b, &[], &t),
            "labels keep tags apart"
        );
        let c = k.connector_tag(&a, &b, b"fields");
        assert!(k.check_connector(&a, &b, b"fields", &c));
        assert!(!k.check_connector(&a, &b, b"fieldz", &c));
        assert!(!CollectiveKey::from_run_token(b"other").check_connector(&a, &b, b"fields", &c));
    }
}
