//! A client's shared state as it is sealed into etcd: the token, its refresh token, its
//! generation and planned refresh, and which host wrote it.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::secret::Secret;
use crate::token::{Token, unix_seconds};

/// One client's state in etcd.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub token: Token,
    pub refresh_token: Option<Secret>,
    pub generation: u64,
    pub next_refresh_at: Option<SystemTime>,
    /// The host that asked the provider for it.
    pub host: String,
}

#[derive(Serialize, Deserialize)]
struct Wire {
    v: u32,
    access_token: String,
    token_type: String,
    issued_at: u64,
    expires_at: u64,
    #[serde(default)]
    scope: Vec<String>,
    #[serde(default)]
    refresh_token: Option<String>,
    generation: u64,
    #[serde(default)]
    next_refresh_at: Option<u64>,
    host: String,
}

impl Record {
    /// The plain bytes to seal.
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        let wire = Zeroizing::new(Wire {
            v: 1,
            access_token: self.token.access_token.expose().to_string(),
            token_type: self.token.token_type.clone(),
            issued_at: unix_seconds(self.token.issued_at),
            expires_at: unix_seconds(self.token.expires_at),
            scope: self.token.scope.clone(),
            refresh_token: self.refresh_token.as_ref().map(|r| r.expose().to_string()),
            generation: self.generation,
            next_refresh_at: self.next_refresh_at.map(unix_seconds),
            host: self.host.clone(),
        });
        Zeroizing::new(serde_json::to_vec(&*wire).unwrap_or_default())
    }

    /// Reads what [`Record::encode`] wrote; the error quotes nothing of the content.
    pub fn decode(bytes: &[u8]) -> Result<Record, String> {
        let wire: Wire = serde_json::from_slice(bytes)
            .map_err(|e| format!("a shared state that is not one ({:?})", e.classify()))?;
        let wire = Zeroizing::new(wire);
        if wire.v != 1 {
            return Err(format!("a shared state of version {}, not 1", wire.v));
        }
        let at = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        Ok(Record {
            token: Token {
                access_token: Secret::new(wire.access_token.clone()),
                token_type: wire.token_type.clone(),
                issued_at: at(wire.issued_at),
                expires_at: at(wire.expires_at),
                scope: wire.scope.clone(),
            },
            refresh_token: wire.refresh_token.clone().map(Secret::new),
            generation: wire.generation,
            next_refresh_at: wire.next_refresh_at.map(at),
            host: wire.host.clone(),
        })
    }
}

impl zeroize::Zeroize for Wire {
    fn zeroize(&mut self) {
        self.access_token.zeroize();
        if let Some(r) = &mut self.refresh_token {
            r.zeroize();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let r = Record {
            token: Token {
                access_token: Secret::new("at"),
                token_type: "Bearer".into(),
                issued_at: t0,
                expires_at: t0 + Duration::from_secs(60),
                scope: vec!["a".into()],
            },
            refresh_token: Some(Secret::new("rt")),
            generation: 7,
            next_refresh_at: Some(t0 + Duration::from_secs(45)),
            host: "web-1".into(),
        };
        assert_eq!(Record::decode(&r.encode()).unwrap(), r);
        let e = Record::decode(b"{\"access_token\":\"secret-ish\"}").unwrap_err();
        assert!(!e.contains("secret-ish"), "{e}");
    }
}
