//! Who may see the status page: the API token or the read-only status token
//! (`--status-token-file`), presented
//!
//! - as `Authorization: Bearer <token>` (scripts, `curl`);
//! - as the cookie [`COOKIE_NAME`] (browsers), which the page sets itself: opening
//!   `/status?token=<token>` answers `303 See Other` to `/status` with the cookie
//!   (`HttpOnly; SameSite=Strict`, [`COOKIE_MAX_AGE_SECS`]), so the token leaves the
//!   address bar. A wrong `?token=` is 401, whatever else the request carries.
//!
//! The cookie and the query parameter are read on the status routes only: no other route
//! accepts a token that way, and the read-only token authorises no other route at all.
//! Tokens are compared in constant time ([`Auth::allows_token`]).

use axum::extract::{Query, Request, State};
use axum::http::header::{COOKIE, LOCATION, SET_COOKIE};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;

use crate::auth::Auth;
use crate::errors::ApiError;

/// Name of the cookie that carries a token to the status routes (its value: the token in
/// unpadded URL-safe base64, so any token is a valid cookie value).
pub const COOKIE_NAME: &str = "mcp_affinity_status";

/// Lifetime of the cookie, in seconds (12 hours).
pub const COOKIE_MAX_AGE_SECS: u64 = 12 * 3600;

/// The tokens the status routes accept.
#[derive(Clone, Debug)]
pub struct StatusAuth {
    api: Auth,
    read_only: Option<Auth>,
}

impl StatusAuth {
    /// Accepts the API's `api` authentication (with [`Auth::Disabled`]: everyone) and,
    /// when given, the read-only token `read_only`.
    pub fn new(api: Auth, read_only: Option<Auth>) -> Self {
        StatusAuth { api, read_only }
    }

    /// Whether `token` is one of the accepted tokens.
    pub fn allows_token(&self, token: &[u8]) -> bool {
        // Both compared, so timing does not tell which one matched.
        let api = self.api.allows_token(token);
        let read_only = self.read_only.as_ref().is_some_and(|a| a.allows_token(token));
        api | read_only
    }

    /// Whether `headers` carry an accepted token, as a bearer token or in the cookie.
    pub fn allows(&self, headers: &HeaderMap) -> bool {
        self.api.allows(headers)
            || self.read_only.as_ref().is_some_and(|a| a.allows(headers))
            || cookie_token(headers).is_some_and(|t| self.allows_token(&t))
    }
}

/// The token of the [`COOKIE_NAME`] cookie, decoded; `None` when absent or not base64.
fn cookie_token(headers: &HeaderMap) -> Option<Vec<u8>> {
    let prefix = format!("{COOKIE_NAME}=");
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| pair.trim().strip_prefix(prefix.as_str()))
        .and_then(|value| URL_SAFE_NO_PAD.decode(value).ok())
}

/// The `Set-Cookie` value that hands `token` to the status routes.
pub fn set_cookie(token: &[u8]) -> HeaderValue {
    let value = format!(
        "{COOKIE_NAME}={}; Path=/; Max-Age={COOKIE_MAX_AGE_SECS}; HttpOnly; SameSite=Strict",
        URL_SAFE_NO_PAD.encode(token)
    );
    HeaderValue::from_str(&value).expect("base64 and ASCII attributes are a valid header value")
}

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

/// The `?token=` of `uri`, percent-decoded.
fn query_token(uri: &Uri) -> Option<String> {
    Query::<TokenQuery>::try_from_uri(uri).ok()?.0.token
}

/// Middleware of the status routes: with `?token=`, 303 to the same path without the
/// query and the cookie set (401 when the token is wrong); else the request passes when
/// [`StatusAuth::allows`] it, and gets 401 `unauthorized` otherwise.
pub async fn require_status_token(State(auth): State<StatusAuth>, request: Request, next: Next) -> Response {
    if let Some(token) = query_token(request.uri()) {
        if !auth.allows_token(token.as_bytes()) {
            return ApiError::unauthorized().into_response();
        }
        let path = HeaderValue::from_str(request.uri().path()).unwrap_or(HeaderValue::from_static(super::PAGE_ROUTE));
        return (
            StatusCode::SEE_OTHER,
            [(LOCATION, path), (SET_COOKIE, set_cookie(token.as_bytes()))],
        )
            .into_response();
    }
    let allowed = auth.allows(request.headers());
    crate::auth::pass_if(allowed, request, next).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(name: axum::http::HeaderName, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn accepts_either_token_by_bearer_or_cookie() {
        let auth = StatusAuth::new(Auth::token("api"), Some(Auth::token("ro")));
        let cookie = |t: &str| headers(COOKIE, &format!("other=1; {COOKIE_NAME}={}", URL_SAFE_NO_PAD.encode(t)));
        for ok in ["api", "ro"] {
            assert!(auth.allows_token(ok.as_bytes()));
            assert!(auth.allows(&headers(axum::http::header::AUTHORIZATION, &format!("Bearer {ok}"))));
            assert!(auth.allows(&cookie(ok)), "{ok}");
        }
        assert!(!auth.allows_token(b"r"));
        assert!(!auth.allows(&cookie("wrong")));
        assert!(!auth.allows(&headers(COOKIE, &format!("{COOKIE_NAME}=!!not-base64"))));
        assert!(!auth.allows(&HeaderMap::new()));
        let api_only = StatusAuth::new(Auth::token("api"), None);
        assert!(!api_only.allows(&cookie("ro")));
        assert!(StatusAuth::new(Auth::Disabled, None).allows(&HeaderMap::new()));
    }

    #[test]
    fn the_cookie_round_trips_any_token() {
        let token = "a;b=c,d\"e";
        let set = set_cookie(token.as_bytes());
        let set = set.to_str().unwrap();
        assert!(set.ends_with("; Path=/; Max-Age=43200; HttpOnly; SameSite=Strict"), "{set}");
        let pair = set.split(';').next().unwrap();
        assert_eq!(cookie_token(&headers(COOKIE, pair)).unwrap(), token.as_bytes());
        let uri: Uri = "/status?token=a%3Bb&x=1".parse().unwrap();
        assert_eq!(query_token(&uri).as_deref(), Some("a;b"));
        assert_eq!(query_token(&"/status".parse().unwrap()), None);
    }
}
