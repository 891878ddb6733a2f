//! The fleet key: every value written to etcd is sealed with AES-256-GCM under it, with a
//! random nonce and the etcd key name as associated data (a value moved to another key does
//! not open), and the per-client part of key names is a keyed digest (a name says nothing of
//! the client's settings to whoever reads etcd without the key).

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::hmac;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use base64::Engine as _;
use zeroize::Zeroizing;

use crate::secret::Secret;

/// The version tag in front of every sealed value.
const MAGIC: &[u8; 4] = b"twf1";

/// The largest value opened: a token, a refresh token and their times fit many times over.
pub const MAX_VALUE: usize = 64 * 1024;

/// The two keys derived from `[fleet] key`. Its Debug shows nothing of them.
pub struct FleetKey {
    seal: LessSafeKey,
    names: hmac::Key,
}

impl std::fmt::Debug for FleetKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FleetKey(..)")
    }
}

/// A value that does not open with this host's key: the key differs from the one that sealed
/// it, or the value was changed or moved to another key.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "a value in etcd does not open with this host's fleet key (a different [fleet] key on another host, or a value changed in etcd)"
)]
pub struct WrongKey;

impl FleetKey {
    /// `[fleet] key`: 32 bytes in standard base64 (`head -c 32 /dev/urandom | base64`).
    pub fn parse(secret: &Secret) -> Result<FleetKey, String> {
        let raw = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(secret.expose().trim())
                .map_err(|_| {
                    "not base64; make one with `head -c 32 /dev/urandom | base64`".to_string()
                })?,
        );
        if raw.len() != 32 {
            return Err(format!(
                "{} bytes once decoded, not 32; make one with `head -c 32 /dev/urandom | base64`",
                raw.len()
            ));
        }
        let master = hmac::Key::new(hmac::HMAC_SHA256, &raw);
        let derive = |label: &[u8]| Zeroizing::new(hmac::sign(&master, label).as_ref().to_vec());
        let seal_bytes = derive(b"tokenwarden fleet v1: values");
        let name_bytes = derive(b"tokenwarden fleet v1: key names");
        let unbound =
            UnboundKey::new(&AES_256_GCM, &seal_bytes).map_err(|_| "unusable key".to_string())?;
        Ok(FleetKey {
            seal: LessSafeKey::new(unbound),
            names: hmac::Key::new(hmac::HMAC_SHA256, &name_bytes),
        })
    }

    /// `plain` sealed for the etcd key `name`.
    pub fn seal(&self, name: &[u8], plain: &[u8]) -> Result<Vec<u8>, String> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| "no random numbers for a nonce".to_string())?;
        let mut out = Vec::with_capacity(MAGIC.len() + NONCE_LEN + plain.len() + 16);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&nonce);
        let mut body = plain.to_vec();
        self.seal
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name),
                &mut body,
            )
            .map_err(|_| "sealing failed".to_string())?;
        out.extend_from_slice(&body);
        body.fill(0);
        Ok(out)
    }

    /// The plain text of `sealed`, read from the etcd key `name`.
    pub fn open(&self, name: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, WrongKey> {
        if sealed.len() > MAX_VALUE || sealed.len() < MAGIC.len() + NONCE_LEN + 16 {
            return Err(WrongKey);
        }
        let (magic, rest) = sealed.split_at(MAGIC.len());
        if magic != MAGIC {
            return Err(WrongKey);
        }
        let (nonce, body) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| WrongKey)?;
        let mut buf = Zeroizing::new(body.to_vec());
        let len = self
            .seal
            .open_in_place(nonce, Aad::from(name), &mut buf)
            .map_err(|_| WrongKey)?
            .len();
        buf.truncate(len);
        Ok(buf)
    }

    /// A short keyed digest of `parts` for key names (32 hex digits).
    pub fn name_digest(&self, parts: &[&str]) -> String {
        let tag = hmac::sign(&self.names, parts.join("\u{0}").as_bytes());
        tag.as_ref()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> FleetKey {
        let b64 = base64::engine::general_purpose::STANDARD.encode([byte; 32]);
        FleetKey::parse(&Secret::new(b64)).unwrap()
    }

    #[test]
    fn sealed_values_open_only_with_the_same_key_and_name() {
        let (a, b) = (key(1), key(2));
        let sealed = a.seal(b"/p/c/x/state", b"hello").unwrap();
        assert_eq!(&a.open(b"/p/c/x/state", &sealed).unwrap()[..], b"hello");
        assert_eq!(b.open(b"/p/c/x/state", &sealed), Err(WrongKey));
        // Moved to another key: refused.
        assert_eq!(a.open(b"/p/c/y/state", &sealed), Err(WrongKey));
        let mut flipped = sealed.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(a.open(b"/p/c/x/state", &flipped), Err(WrongKey));
        // Random nonces: the same value seals differently each time.
        assert_ne!(sealed, a.seal(b"/p/c/x/state", b"hello").unwrap());
    }

    #[test]
    fn bad_keys_are_refused_without_quoting_them() {
        for bad in ["not base64 at all!", "c2hvcnQ=", ""] {
            let e = FleetKey::parse(&Secret::new(bad)).unwrap_err();
            assert!(!bad.is_empty() && !e.contains(bad) || bad.is_empty(), "{e}");
            assert!(e.contains("head -c 32 /dev/urandom | base64"), "{e}");
        }
        assert_eq!(format!("{:?}", key(3)), "FleetKey(..)");
    }

    #[test]
    fn name_digests_depend_on_the_key() {
        assert_eq!(
            key(1).name_digest(&["a", "b"]),
            key(1).name_digest(&["a", "b"])
        );
        assert_ne!(
            key(1).name_digest(&["a", "b"]),
            key(2).name_digest(&["a", "b"])
        );
        assert_eq!(key(1).name_digest(&["a"]).len(), 32);
    }
}
