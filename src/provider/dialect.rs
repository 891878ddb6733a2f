//! The seed dialects (docs/oauth.md#provider-styles): where each one's token endpoint lives on the
//! provider, which grants it accepts, and how its successful responses are shaped.
//!
//! Everything here is a pure table, so the quirks of each provider can be read in one place:
//!
//! | dialect | path | grants | `token_type` | `expires_in` | `scope` echoed | refresh tokens |
//! |---|---|---|---|---|---|---|
//! | Transatel | `/transatel/authentication/api/token` | client_credentials | `bearer` | number | no | no |
//! | Creads | `/creads/oauth2/token` | password, refresh_token | `bearer` | number | yes | yes |
//! | Talentsoft (application) | `/talentsoft/token` | client_credentials | `Bearer` | **string** | no | no |
//! | Talentsoft (user) | `/talentsoft/token` | jwt-bearer | `Bearer` | **string** | no | no |
//! | Talkdesk | `/talkdesk/oauth/token` (+ `-eu`, `-ca`) | client_credentials, refresh_token | `Bearer` | number | yes | yes, always |

use std::fmt;

use serde_json::{Map, Value, json};

/// A provider style (docs/oauth.md#provider-styles). Each one is served at its own path on the one
/// provider.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dialect {
    /// Transatel: client credentials, HTTP Basic, and an access token that is itself a JWT.
    Transatel,
    /// Creads Partners: password grant then rotating refresh tokens, HTTP Basic, fixed scopes.
    Creads,
    /// Talentsoft application: client credentials with `client_secret_post`; `expires_in` is a
    /// JSON string.
    TalentsoftApp,
    /// Talentsoft user: the RFC 7523 §2.1 jwt-bearer grant with an HS256 assertion signed with the
    /// client secret; no other client authentication.
    TalentsoftUser,
    /// Talkdesk: client credentials with `private_key_jwt` (RFC 7523 §2.2), regional token URLs,
    /// and responses carrying `scope`, `refresh_token`, `id_token` and `sid`.
    Talkdesk,
}

impl Dialect {
    /// Every dialect.
    pub const ALL: [Dialect; 5] = [
        Dialect::Transatel,
        Dialect::Creads,
        Dialect::TalentsoftApp,
        Dialect::TalentsoftUser,
        Dialect::Talkdesk,
    ];

    /// The path of this dialect's token endpoint (for Talkdesk, the `.com` region's).
    pub fn path(self) -> &'static str {
        match self {
            Dialect::Transatel => "/transatel/authentication/api/token",
            Dialect::Creads => "/creads/oauth2/token",
            Dialect::TalentsoftApp | Dialect::TalentsoftUser => "/talentsoft/token",
            Dialect::Talkdesk => TalkdeskRegion::Com.path(),
        }
    }

    /// The grants this dialect accepts; any other is `unsupported_grant_type` (RFC 6749 §5.2).
    pub fn grants(self) -> &'static [Grant] {
        match self {
            Dialect::Transatel | Dialect::TalentsoftApp => &[Grant::ClientCredentials],
            Dialect::Creads => &[Grant::Password, Grant::RefreshToken],
            Dialect::TalentsoftUser => &[Grant::JwtBearer],
            Dialect::Talkdesk => &[Grant::ClientCredentials, Grant::RefreshToken],
        }
    }

    /// The `token_type` this dialect writes: the casing varies between providers on purpose.
    pub fn token_type(self) -> &'static str {
        match self {
            Dialect::Transatel | Dialect::Creads => "bearer",
            Dialect::TalentsoftApp | Dialect::TalentsoftUser | Dialect::Talkdesk => "Bearer",
        }
    }

    /// Whether the response carries the granted `scope` (RFC 6749 §5.1 lets a provider omit it
    /// when it is the requested one).
    pub fn echoes_scope(self) -> bool {
        matches!(self, Dialect::Creads | Dialect::Talkdesk)
    }

    /// Whether `expires_in` is written as a JSON string (`"3600"`) rather than a number.
    pub fn expires_in_as_string(self) -> bool {
        matches!(self, Dialect::TalentsoftApp | Dialect::TalentsoftUser)
    }

    /// Whether clients of this dialect get refresh tokens unless told otherwise
    /// ([`crate::provider::RegisteredClient::refresh_tokens`]). Talkdesk issues one with every
    /// token, client credentials included; Creads with the password and refresh grants.
    pub fn issues_refresh_tokens(self) -> bool {
        matches!(self, Dialect::Creads | Dialect::Talkdesk)
    }

    /// A short name used in access tokens and logs.
    pub fn short_name(self) -> &'static str {
        match self {
            Dialect::Transatel => "transatel",
            Dialect::Creads => "creads",
            Dialect::TalentsoftApp => "talentsoft-app",
            Dialect::TalentsoftUser => "talentsoft-user",
            Dialect::Talkdesk => "talkdesk",
        }
    }
}

impl fmt::Display for Dialect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.short_name())
    }
}

/// Talkdesk's regional token endpoints (`.com`, `.eu`, `ca`), all served by the one provider.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TalkdeskRegion {
    /// `/talkdesk/oauth/token`.
    Com,
    /// `/talkdesk-eu/oauth/token`.
    Eu,
    /// `/talkdesk-ca/oauth/token`.
    Ca,
}

impl TalkdeskRegion {
    /// The path of this region's token endpoint.
    pub fn path(self) -> &'static str {
        match self {
            TalkdeskRegion::Com => "/talkdesk/oauth/token",
            TalkdeskRegion::Eu => "/talkdesk-eu/oauth/token",
            TalkdeskRegion::Ca => "/talkdesk-ca/oauth/token",
        }
    }
}

/// The dialects whose clients may post to `path`; empty for a path that is no token endpoint.
pub fn dialects_at(path: &str) -> &'static [Dialect] {
    match path {
        "/transatel/authentication/api/token" => &[Dialect::Transatel],
        "/creads/oauth2/token" => &[Dialect::Creads],
        "/talentsoft/token" => &[Dialect::TalentsoftApp, Dialect::TalentsoftUser],
        "/talkdesk/oauth/token" | "/talkdesk-eu/oauth/token" | "/talkdesk-ca/oauth/token" => {
            &[Dialect::Talkdesk]
        }
        _ => &[],
    }
}

/// The grant types the provider knows (RFC 6749 §4.3, §4.4, §6; RFC 7523 §2.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Grant {
    /// `client_credentials` (RFC 6749 §4.4).
    ClientCredentials,
    /// `password` (RFC 6749 §4.3).
    Password,
    /// `refresh_token` (RFC 6749 §6).
    RefreshToken,
    /// `urn:ietf:params:oauth:grant-type:jwt-bearer` (RFC 7523 §2.1).
    JwtBearer,
}

/// The `grant_type` value of the jwt-bearer grant (RFC 7523 §2.1).
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

impl Grant {
    /// The grant named by a `grant_type` value, if the provider knows it. Values are
    /// case-sensitive, as in RFC 6749.
    pub fn parse(value: &str) -> Option<Grant> {
        match value {
            "client_credentials" => Some(Grant::ClientCredentials),
            "password" => Some(Grant::Password),
            "refresh_token" => Some(Grant::RefreshToken),
            JWT_BEARER_GRANT => Some(Grant::JwtBearer),
            _ => None,
        }
    }

    /// The `grant_type` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Grant::ClientCredentials => "client_credentials",
            Grant::Password => "password",
            Grant::RefreshToken => "refresh_token",
            Grant::JwtBearer => JWT_BEARER_GRANT,
        }
    }
}

/// What the provider decided to hand out, before the dialect shapes it into JSON.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Issue {
    pub access_token: String,
    /// Whole seconds; the sub-second rest of a registered lifetime is dropped.
    pub expires_in: u64,
    /// Whether `expires_in` is left out (to exercise the JWT `exp` and `default_lifetime` paths).
    pub omit_expires_in: bool,
    pub scope: Vec<String>,
    pub refresh_token: Option<String>,
    pub id_token: Option<String>,
    pub sid: Option<String>,
}

/// The JSON body of a successful token response (RFC 6749 §5.1) in `dialect`'s shape.
pub(crate) fn token_body(dialect: Dialect, issue: &Issue) -> Value {
    let mut m = Map::new();
    m.insert("access_token".into(), json!(issue.access_token));
    m.insert("token_type".into(), json!(dialect.token_type()));
    if !issue.omit_expires_in {
        let v = if dialect.expires_in_as_string() {
            json!(issue.expires_in.to_string())
        } else {
            json!(issue.expires_in)
        };
        m.insert("expires_in".into(), v);
    }
    if dialect.echoes_scope() && !issue.scope.is_empty() {
        m.insert("scope".into(), json!(issue.scope.join(" ")));
    }
    if let Some(rt) = &issue.refresh_token {
        m.insert("refresh_token".into(), json!(rt));
    }
    if let Some(id) = &issue.id_token {
        m.insert("id_token".into(), json!(id));
    }
    if let Some(sid) = &issue.sid {
        m.insert("sid".into(), json!(sid));
    }
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_dialect_is_served_at_its_own_path() {
        for d in Dialect::ALL {
            assert!(dialects_at(d.path()).contains(&d), "{d}");
        }
        for r in [TalkdeskRegion::Com, TalkdeskRegion::Eu, TalkdeskRegion::Ca] {
            assert_eq!(dialects_at(r.path()), &[Dialect::Talkdesk]);
        }
        assert!(dialects_at("/").is_empty());
        assert!(dialects_at("/creads/oauth2/token/").is_empty());
    }

    #[test]
    fn grant_names_round_trip_and_are_case_sensitive() {
        for g in [
            Grant::ClientCredentials,
            Grant::Password,
            Grant::RefreshToken,
            Grant::JwtBearer,
        ] {
            assert_eq!(Grant::parse(g.as_str()), Some(g));
        }
        assert_eq!(Grant::parse("Client_Credentials"), None);
        assert_eq!(Grant::parse("jwt_bearer"), None);
        assert_eq!(Grant::parse("authorization_code"), None);
    }

    #[test]
    fn response_shapes_per_dialect() {
        let issue = Issue {
            access_token: "at".into(),
            expires_in: 3600,
            scope: vec!["base".into(), "files".into()],
            refresh_token: Some("rt".into()),
            ..Issue::default()
        };
        // (dialect, token_type, expires_in, scope)
        let table = [
            (Dialect::Transatel, "bearer", json!(3600), None),
            (Dialect::Creads, "bearer", json!(3600), Some("base files")),
            (Dialect::TalentsoftApp, "Bearer", json!("3600"), None),
            (Dialect::TalentsoftUser, "Bearer", json!("3600"), None),
            (Dialect::Talkdesk, "Bearer", json!(3600), Some("base files")),
        ];
        for (d, tt, exp, scope) in table {
            let body = token_body(d, &issue);
            assert_eq!(body["token_type"], tt, "{d}");
            assert_eq!(body["expires_in"], exp, "{d}");
            assert_eq!(body.get("scope").and_then(Value::as_str), scope, "{d}");
            assert_eq!(body["refresh_token"], "rt");
        }
        let body = token_body(
            Dialect::Transatel,
            &Issue {
                omit_expires_in: true,
                ..issue
            },
        );
        assert!(body.get("expires_in").is_none());
    }
}
