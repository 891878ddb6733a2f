//! RFC 8693 token exchange: the request's parameters (§2.1) and the checks of the answer
//! (§2.2.1).
//!
//! The subject token comes from a secret source (read before each request, like an assertion
//! file) or, for a chained client, from another client of the daemon: its refresher hands the
//! upstream's current token to the request with [`with_upstream_token`], which puts it where
//! [`crate::oauth::prepare`] finds it for the length of that one request, and nowhere else.

use std::borrow::Cow;
use std::future::Future;
use std::time::SystemTime;

use serde_json::Value;

use super::assertion_file;
use super::error::OAuthError;
use super::response::ResponseMeta;
use crate::config::{Subject, TOKEN_TYPE_ACCESS_TOKEN, TOKEN_TYPE_JWT, TokenExchange};
use crate::secret::Secret;

tokio::task_local! {
    /// The upstream client's token for the request being made.
    static UPSTREAM_TOKEN: Secret;
}

/// Runs `request` (one [`crate::oauth::acquire`]) with `token` as the subject token of a
/// chained client.
pub async fn with_upstream_token<F: Future>(token: Secret, request: F) -> F::Output {
    UPSTREAM_TOKEN.scope(token, request).await
}

/// Adds the §2.1 parameters after `grant_type`: `subject_token`, `subject_token_type`, and the
/// optional actor token and requested type. (`audience`, `resource` and `scope` are the
/// client's common keys, added by the caller.)
pub(super) fn push_form(
    x: &TokenExchange,
    now: SystemTime,
    form: &mut Vec<(Cow<'static, str>, Secret)>,
) -> Result<(), OAuthError> {
    let subject = match &x.subject {
        Subject::Source(source) => assertion_file::read(
            source,
            "subject_token",
            x.subject_token_type == TOKEN_TYPE_JWT,
            now,
        )?,
        Subject::Client(upstream) => UPSTREAM_TOKEN.try_with(Secret::clone).map_err(|_| {
            OAuthError::Assertion(format!(
                "subject_token: client \"{upstream}\" has no valid token to exchange yet; this client asks once it has one"
            ))
        })?,
    };
    form.push(("subject_token".into(), subject));
    form.push((
        "subject_token_type".into(),
        Secret::new(x.subject_token_type.clone()),
    ));
    if let Some((source, t)) = &x.actor {
        let actor = assertion_file::read(source, "actor_token", t == TOKEN_TYPE_JWT, now)?;
        form.push(("actor_token".into(), actor));
        form.push(("actor_token_type".into(), Secret::new(t.clone())));
    }
    if let Some(t) = &x.requested_token_type {
        form.push(("requested_token_type".into(), Secret::new(t.clone())));
    }
    Ok(())
}

/// RFC 8693 §2.2.1: `issued_token_type` is required, and `token_type` `N_A` only fits a token
/// that is not an access token. The error names the field, never a value of the body.
pub(super) fn check_issued(
    meta: &ResponseMeta,
    body: &[u8],
    token_type: &str,
) -> Result<(), OAuthError> {
    let malformed = |reason: String| OAuthError::Malformed {
        status: meta.status,
        content_type: meta.content_type.clone(),
        length: body.len(),
        reason,
    };
    let object: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let issued = match object.get("issued_token_type") {
        Some(Value::String(s)) if !s.is_empty() => s.as_str(),
        _ => {
            return Err(malformed(
                "no issued_token_type in a token exchange response (RFC 8693 §2.2.1)".into(),
            ));
        }
    };
    if token_type == "N_A" && issued == TOKEN_TYPE_ACCESS_TOKEN {
        return Err(malformed(
            "token_type N_A with issued_token_type access_token: an access token needs a token type (RFC 8693 §2.2.1)".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_token_type_is_required_and_n_a_fits_only_other_tokens() {
        let meta = ResponseMeta {
            status: 200,
            content_type: Some("application/json".into()),
            retry_after: None,
            date: None,
        };
        let at = TOKEN_TYPE_ACCESS_TOKEN;
        let id = "urn:ietf:params:oauth:token-type:id_token";
        let cases: &[(String, &str, bool)] = &[
            (format!(r#"{{"issued_token_type":"{at}"}}"#), "Bearer", true),
            (format!(r#"{{"issued_token_type":"{id}"}}"#), "N_A", true),
            (format!(r#"{{"issued_token_type":"{at}"}}"#), "N_A", false),
            (r#"{"access_token":"x"}"#.to_string(), "Bearer", false),
            (r#"{"issued_token_type":""}"#.to_string(), "Bearer", false),
            (r#"{"issued_token_type":5}"#.to_string(), "Bearer", false),
        ];
        for (body, token_type, ok) in cases {
            let r = check_issued(&meta, body.as_bytes(), token_type);
            assert_eq!(r.is_ok(), *ok, "{body} {token_type}: {r:?}");
        }
    }

    #[tokio::test]
    async fn the_upstream_token_is_seen_only_inside_its_request() {
        let x = TokenExchange {
            subject: Subject::Client("up".into()),
            subject_token_type: TOKEN_TYPE_ACCESS_TOKEN.into(),
            actor: None,
            requested_token_type: None,
        };
        let mut form = Vec::new();
        let e = push_form(&x, SystemTime::now(), &mut form).unwrap_err();
        assert!(
            e.to_string().contains("client \"up\" has no valid token"),
            "{e}"
        );
        let got = with_upstream_token(Secret::new("tok"), async {
            let mut form = Vec::new();
            push_form(&x, SystemTime::now(), &mut form).map(|()| form)
        })
        .await
        .unwrap();
        assert_eq!(got[0].0, "subject_token");
        assert_eq!(got[0].1.expose(), "tok");
        assert_eq!(got[1].1.expose(), TOKEN_TYPE_ACCESS_TOKEN);
    }
}
