//! Bearer-token authentication of the `/v1` routes.
//!
//! The token is compared in constant time ([`subtle`]); only its length can be learnt
//! from timing. The token is never logged (its `Debug` is redacted).

use std::fmt;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::errors::ApiError;

/// How `/v1` requests are authenticated.
#[derive(Clone)]
pub enum Auth {
    /// `Authorization: Bearer <token>` must carry exactly this token.
    Token(Arc<[u8]>),
    /// No authentication (`--insecure-no-auth`; development only).
    Disabled,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Auth::Token(_) => f.write_str("Auth::Token(<redacted>)"),
            Auth::Disabled => f.write_str("Auth::Disabled"),
        }
    }
}

impl Auth {
    /// Authentication by `token`.
    pub fn token(token: &str) -> Self {
        Auth::Token(Arc::from(token.as_bytes()))
    }

    /// Whether `headers` carry an acceptable `Authorization` header. The scheme `Bearer`
    /// is matched case-insensitively; the token exactly, in constant time.
    pub fn allows(&self, headers: &HeaderMap) -> bool {
        if let Auth::Disabled = self {
            return true;
        }
        let Some(value) = headers.get(AUTHORIZATION) else { return false };
        let Some((scheme, presented)) = value.as_bytes().split_at_checked(7) else {
            return false;
        };
        scheme.eq_ignore_ascii_case(b"bearer ") && self.allows_token(presented)
    }

    /// Whether `presented` is the token (in constant time; always `true` when disabled).
    /// For tokens that come by another way than the `Authorization` header (the status
    /// page's cookie and query parameter, [`crate::status_page::auth`]).
    pub fn allows_token(&self, presented: &[u8]) -> bool {
        match self {
            Auth::Token(expected) => bool::from(presented.ct_eq(expected)),
            Auth::Disabled => true,
        }
    }
}

/// Middleware: answers 401 `unauthorized` unless [`Auth::allows`] the request.
pub async fn require_bearer(State(auth): State<Auth>, request: Request, next: Next) -> Response {
    let allowed = auth.allows(request.headers());
    pass_if(allowed, request, next).await
}

/// Middleware tail: runs `request` through `next` when `allowed`, else answers 401
/// `unauthorized`.
pub async fn pass_if(allowed: bool, request: Request, next: Next) -> Response {
    if allowed {
        next.run(request).await
    } else {
        ApiError::unauthorized().into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn checks_scheme_and_token() {
        let auth = Auth::token("s3cret");
        assert!(auth.allows(&headers("Bearer s3cret")));
        assert!(auth.allows(&headers("bearer s3cret")));
        assert!(!auth.allows(&headers("Bearer s3cre")));
        assert!(!auth.allows(&headers("Bearer s3cret ")));
        assert!(!auth.allows(&headers("Basic s3cret")));
        assert!(!auth.allows(&headers("Bearer")));
        assert!(!auth.allows(&HeaderMap::new()));
        assert!(Auth::Disabled.allows(&HeaderMap::new()));
        assert_eq!(format!("{auth:?}"), "Auth::Token(<redacted>)");
    }
}
