//! The operator commands' HTTP client of control's API: one method per route used, every
//! failure turned into a one-line [`CliError`] with its exit code.

use std::time::Duration;

use mcp_affinity_proto::draining::{Drain, DrainingList};
use mcp_affinity_proto::sessions::{SessionRecord, encode_segment};
use reqwest::{Method, StatusCode};

use super::exit;

/// A failure of an operator command: its exit code ([`exit`]) and one line for stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliError {
    /// The process exit code.
    pub code: i32,
    /// What went wrong, one line.
    pub message: String,
}

impl CliError {
    pub(crate) fn new(code: i32, message: impl Into<String>) -> Self {
        CliError { code, message: message.into() }
    }
}

/// Control's API at one base URL, with an optional bearer token.
pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

/// Upper bound of one call.
const TIMEOUT: Duration = Duration::from_secs(10);

/// An error answer of the API (`{"code","message"}`), or what stood in its place.
struct ApiAnswer {
    status: StatusCode,
    code: String,
    message: String,
}

impl Client {
    /// A client of the API at `base` (`http://host:port`, no trailing slash).
    ///
    /// # Errors
    /// [`exit::USAGE`] when `base` is not an http(s) URL.
    pub fn new(base: String, token: Option<String>) -> Result<Client, CliError> {
        let parsed = reqwest::Url::parse(&base).map_err(|e| CliError::new(exit::USAGE, format!("invalid --url {base:?}: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(CliError::new(exit::USAGE, format!("invalid --url {base:?}: expected http://HOST:PORT")));
        }
        let http = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .build()
            .map_err(|e| CliError::new(exit::FAILURE, format!("cannot build an HTTP client: {e}")))?;
        Ok(Client { base, token: token.filter(|t| !t.is_empty()), http })
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    async fn call(&self, method: Method, path: &str) -> Result<(StatusCode, Vec<u8>), CliError> {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let response = request.send().await.map_err(|e| self.unreachable(&e))?;
        let status = response.status();
        let body = response.bytes().await.map_err(|e| self.unreachable(&e))?;
        Ok((status, body.to_vec()))
    }

    fn unreachable(&self, e: &reqwest::Error) -> CliError {
        // The innermost cause says it best ("Connection refused (os error 111)").
        let mut cause: &dyn std::error::Error = e;
        while let Some(next) = cause.source() {
            cause = next;
        }
        let what = if e.is_timeout() { format!("no answer within {}s", TIMEOUT.as_secs()) } else { cause.to_string() };
        CliError::new(exit::UNREACHABLE, format!("control at {} is not reachable: {what}", self.base))
    }

    fn api_answer(status: StatusCode, body: &[u8]) -> ApiAnswer {
        #[derive(serde::Deserialize)]
        struct Body {
            code: String,
            message: String,
        }
        match serde_json::from_slice::<Body>(body) {
            Ok(b) => ApiAnswer { status, code: b.code, message: b.message },
            Err(_) => ApiAnswer {
                status,
                code: String::new(),
                message: String::from_utf8_lossy(&body[..body.len().min(200)]).trim().to_string(),
            },
        }
    }

    /// The error of an answer no caller expected, by status and code.
    fn error(&self, status: StatusCode, body: &[u8]) -> CliError {
        let a = Self::api_answer(status, body);
        let detail = if a.code.is_empty() { format!("{}", a.status) } else { format!("{} {}", a.status.as_u16(), a.code) };
        match (a.status, a.code.as_str()) {
            (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN, _) if self.token.is_none() => CliError::new(
                exit::UNAUTHORIZED,
                format!("control refused the request ({detail}): no token given; pass --token-file PATH or set MCP_AFFINITY_CONTROL_TOKEN"),
            ),
            (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN, _) => CliError::new(
                exit::UNAUTHORIZED,
                format!("control refused the token ({detail}): check --token-file / MCP_AFFINITY_CONTROL_TOKEN"),
            ),
            (StatusCode::BAD_REQUEST, "invalid_upstream" | "invalid_session_id") => CliError::new(exit::USAGE, a.message),
            (StatusCode::NOT_FOUND, "session_not_found" | "not_draining") => CliError::new(exit::NOT_FOUND, a.message),
            (StatusCode::NOT_FOUND, _) => CliError::new(
                exit::FAILURE,
                format!("{} answered {detail} ({}): is this control's API?", self.base, a.message),
            ),
            _ if a.message.is_empty() => CliError::new(exit::FAILURE, format!("control answered {detail}")),
            _ => CliError::new(exit::FAILURE, format!("control answered {detail}: {}", a.message)),
        }
    }

    fn json<T: serde::de::DeserializeOwned>(&self, what: &str, body: &[u8]) -> Result<T, CliError> {
        serde_json::from_slice(body).map_err(|e| CliError::new(exit::FAILURE, format!("{} answered a {what} that cannot be read: {e}", self.base)))
    }

    /// `GET /healthz`: `Ok` when it answers 200.
    pub async fn healthz(&self) -> Result<(), CliError> {
        match self.call(Method::GET, "/healthz").await? {
            (StatusCode::OK, _) => Ok(()),
            (status, body) => Err(self.error(status, &body)),
        }
    }

    /// `GET /readyz`: `Ok(Err(why))` when control answers that it is not ready.
    pub async fn readyz(&self) -> Result<Result<(), String>, CliError> {
        match self.call(Method::GET, "/readyz").await? {
            (StatusCode::OK, _) => Ok(Ok(())),
            (StatusCode::SERVICE_UNAVAILABLE, body) => {
                let a = Self::api_answer(StatusCode::SERVICE_UNAVAILABLE, &body);
                Ok(Err(format!("{} ({})", a.message, a.code)))
            }
            (status, body) => Err(self.error(status, &body)),
        }
    }

    /// `GET /metrics`: the exposition text.
    pub async fn metrics(&self) -> Result<String, CliError> {
        match self.call(Method::GET, "/metrics").await? {
            (StatusCode::OK, body) => Ok(String::from_utf8_lossy(&body).into_owned()),
            (status, body) => Err(self.error(status, &body)),
        }
    }

    /// `GET /v1/upstreams/draining`.
    pub async fn draining(&self) -> Result<DrainingList, CliError> {
        match self.call(Method::GET, "/v1/upstreams/draining").await? {
            (StatusCode::OK, body) => self.json("draining list", &body),
            (status, body) => Err(self.error(status, &body)),
        }
    }

    /// `POST /v1/upstreams/{upstream}/drain`: the drain (new, or the one going on).
    pub async fn drain(&self, upstream: &str) -> Result<Drain, CliError> {
        match self.call(Method::POST, &format!("/v1/upstreams/{}/drain", encode_segment(upstream))).await? {
            (StatusCode::OK, body) => self.json("drain", &body),
            (status, body) => Err(self.error(status, &body)),
        }
    }

    /// `DELETE /v1/upstreams/{upstream}/drain`.
    pub async fn undrain(&self, upstream: &str) -> Result<(), CliError> {
        match self.call(Method::DELETE, &format!("/v1/upstreams/{}/drain", encode_segment(upstream))).await? {
            (StatusCode::NO_CONTENT | StatusCode::OK, _) => Ok(()),
            (status, body) => Err(self.error(status, &body)),
        }
    }

    /// `GET /v1/sessions/{id}`: the record and the JSON text control answered.
    pub async fn session(&self, id: &str) -> Result<(SessionRecord, String), CliError> {
        if id.is_empty() {
            return Err(CliError::new(exit::USAGE, "the session id is empty"));
        }
        match self.call(Method::GET, &format!("/v1/sessions/{}", encode_segment(id))).await? {
            (StatusCode::OK, body) => {
                let record = SessionRecord::parse(&body).map_err(|e| CliError::new(exit::FAILURE, format!("{}: {e}", self.base)))?;
                Ok((record, String::from_utf8_lossy(&body).into_owned()))
            }
            (status, body) => Err(self.error(status, &body)),
        }
    }
}
