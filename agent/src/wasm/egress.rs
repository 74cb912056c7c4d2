//! The egress policy of `call_api`: which hosts a guest's `wasi:http` request may reach,
//! the secret headers the host adds, and the bounds on what goes out and comes back.
//!
//! It is checked twice: before the guest runs (so a refusal names the host and no
//! instance is even made) and again in [`EgressHooks::send_request`], where the request is
//! about to be sent, so a guest cannot get around the first check.

use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::uri::Uri;
use patchflow_core::ToolPolicy;
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody, WasiHttpHooks};

use crate::tools::ToolError;

/// Methods `call_api` may use.
pub const METHODS: [&str; 6] = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"];
/// Request bounds: header count, one header's size, body size.
pub const MAX_HEADERS: usize = 32;
pub const MAX_HEADER_BYTES: usize = 8 * 1024;
pub const MAX_REQUEST_BODY: usize = 1024 * 1024;
/// What the guest reads of a response body before cutting it.
pub const MAX_RESPONSE_BODY: u32 = 256 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

/// A secret header with its value, read from the agent's environment.
#[derive(Clone)]
struct Secret {
    host: String,
    name: HeaderName,
    value: HeaderValue,
    raw: String,
}

/// Where requests may go and what the host adds to them.
#[derive(Clone, Default)]
pub struct Egress {
    allow: Vec<String>,
    secrets: Vec<Secret>,
}

impl std::fmt::Debug for Egress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Egress")
            .field("allow", &self.allow)
            .field(
                "secrets",
                &self
                    .secrets
                    .iter()
                    .map(|s| format!("{}: {}", s.host, s.name))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Egress {
    /// Nothing may leave.
    pub fn none() -> Self {
        Self::default()
    }

    /// Only `host` (a `name` or `name:port`).
    pub fn only(host: &str) -> Self {
        Self {
            allow: vec![host.to_ascii_lowercase()],
            secrets: Vec::new(),
        }
    }

    /// The task's policy, with secret values read from this process's environment
    /// through `lookup` (a missing variable is an error naming it, never its value).
    pub fn from_policy(
        policy: &ToolPolicy,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, String> {
        let mut secrets = Vec::new();
        for s in &policy.secrets {
            let raw = lookup(&s.env).ok_or_else(|| {
                format!(
                    "policy secret `{}` for {} needs the environment variable {}, which is not set",
                    s.header, s.host, s.env
                )
            })?;
            let name = HeaderName::from_bytes(s.header.as_bytes())
                .map_err(|_| format!("`{}` is not a header name", s.header))?;
            let mut value = HeaderValue::from_str(&raw)
                .map_err(|_| format!("the value of {} is not a valid header value", s.env))?;
            value.set_sensitive(true);
            secrets.push(Secret {
                host: s.host.to_ascii_lowercase(),
                name,
                value,
                raw,
            });
        }
        Ok(Self {
            allow: policy
                .allow_hosts
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            secrets,
        })
    }

    /// The allow-list entry a request to `host` on `port` falls under, if any.
    fn rule_for(&self, host: &str, port: Option<u16>) -> Option<&str> {
        let host = host.to_ascii_lowercase();
        self.allow
            .iter()
            .find(|rule| **rule == host || port.is_some_and(|p| **rule == format!("{host}:{p}")))
            .map(String::as_str)
    }

    /// Checks a request the model asked for; returns it as the guest will send it. The
    /// refusal says which host and what is allowed, and happens before any connection.
    pub fn check(
        &self,
        method: &str,
        url: &str,
        headers: &[(String, String)],
        body: Option<&str>,
    ) -> Result<(), ToolError> {
        let method_up = method.to_ascii_uppercase();
        if !METHODS.contains(&method_up.as_str()) {
            return Err(ToolError::new(format!(
                "call_api: method `{method}` is not allowed; use one of {}",
                METHODS.join(", ")
            )));
        }
        let uri: Uri = url
            .parse()
            .map_err(|_| ToolError::new(format!("call_api: `{url}` is not a valid URL")))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) {
            return Err(ToolError::new(format!(
                "call_api: `{url}` must start with http:// or https://"
            )));
        }
        let Some(host) = uri.host() else {
            return Err(ToolError::new(format!("call_api: `{url}` has no host")));
        };
        if self.rule_for(host, effective_port(&uri)).is_none() {
            let allowed = if self.allow.is_empty() {
                "none".to_string()
            } else {
                self.allow.join(", ")
            };
            return Err(ToolError::new(format!(
                "call_api: host `{}` is not allowed by this task's policy (allowed hosts: {allowed})",
                uri.authority().map(|a| a.as_str()).unwrap_or(host)
            )));
        }
        if headers.len() > MAX_HEADERS {
            return Err(ToolError::new(format!(
                "call_api: at most {MAX_HEADERS} headers"
            )));
        }
        if let Some((k, _)) = headers
            .iter()
            .find(|(k, v)| k.len() + v.len() > MAX_HEADER_BYTES)
        {
            return Err(ToolError::new(format!(
                "call_api: header `{k}` is longer than {MAX_HEADER_BYTES} bytes"
            )));
        }
        if body.is_some_and(|b| b.len() > MAX_REQUEST_BODY) {
            return Err(ToolError::new(format!(
                "call_api: the body is larger than {MAX_REQUEST_BODY} bytes"
            )));
        }
        Ok(())
    }

    /// Whether the host sets header `name` itself (the model's value would be replaced).
    pub fn is_secret_header(&self, name: &str) -> bool {
        self.secrets
            .iter()
            .any(|s| s.name.as_str().eq_ignore_ascii_case(name))
    }

    /// `text` with every secret value replaced, for anything the model or transcript sees.
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        for s in &self.secrets {
            if !s.raw.is_empty() {
                out = out.replace(&s.raw, "[secret]");
            }
        }
        out
    }
}

/// The port a request goes to: the URL's, or its scheme's default.
fn effective_port(uri: &Uri) -> Option<u16> {
    uri.port_u16().or(match uri.scheme_str() {
        Some("https") => Some(443),
        Some("http") => Some(80),
        _ => None,
    })
}

/// The `wasi:http` hooks of one guest instance.
pub struct EgressHooks {
    egress: Arc<Egress>,
}

impl EgressHooks {
    pub fn new(egress: Arc<Egress>) -> Self {
        Self { egress }
    }
}

type SendFuture = Box<
    dyn std::future::Future<
            Output = Result<
                (
                    http::Response<WasiBody>,
                    Box<dyn std::future::Future<Output = Result<(), HttpError>> + Send>,
                ),
                HttpError,
            >,
        > + Send,
>;

impl WasiHttpHooks for EgressHooks {
    fn send_request(
        &mut self,
        mut request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn std::future::Future<Output = Result<(), HttpError>> + Send>,
    ) -> SendFuture {
        let uri = request.uri().clone();
        let host = uri.host().unwrap_or_default().to_string();
        let allowed = self.egress.rule_for(&host, effective_port(&uri)).is_some();
        if !allowed {
            tracing::warn!(host = %host, "call_api request refused by the egress policy");
            return Box::new(async { Err(HttpError::HttpRequestDenied) });
        }
        // A secret goes only where its entry names: `host` (any port) or `host:port`.
        let port = effective_port(&uri).map(|p| format!("{}:{p}", host.to_ascii_lowercase()));
        let host_lower = host.to_ascii_lowercase();
        let headers = request.headers_mut();
        for s in &self.egress.secrets {
            if s.host == host_lower || Some(&s.host) == port.as_ref() {
                headers.insert(s.name.clone(), s.value.clone());
            }
        }
        let bound = |d: Option<Duration>, max: Duration| Some(d.map_or(max, |d| d.min(max)));
        let options = options.unwrap_or_default();
        let options = RequestOptions {
            connect_timeout: bound(options.connect_timeout, CONNECT_TIMEOUT),
            first_byte_timeout: bound(options.first_byte_timeout, RESPONSE_TIMEOUT),
            between_bytes_timeout: bound(options.between_bytes_timeout, RESPONSE_TIMEOUT),
        };
        let _ = fut;
        Box::new(async move {
            use http_body_util::BodyExt;
            let (res, io) =
                wasmtime_wasi_http::default_send_request(request, Some(options)).await?;
            Ok((
                res.map(BodyExt::boxed_unsync),
                Box::new(io) as Box<dyn std::future::Future<Output = _> + Send>,
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_match_by_name_or_name_and_port() {
        let policy = ToolPolicy {
            allow_hosts: vec!["api.example.com:443".into(), "127.0.0.1".into()],
            ..ToolPolicy::default()
        };
        let e = Egress::from_policy(&policy, |_| None).unwrap();
        assert!(
            e.check("GET", "https://api.example.com/v1", &[], None)
                .is_ok()
        );
        let refused = e
            .check("GET", "http://api.example.com/v1", &[], None)
            .unwrap_err()
            .to_string();
        assert_eq!(
            refused,
            "call_api: host `api.example.com` is not allowed by this task's policy (allowed hosts: api.example.com:443, 127.0.0.1)"
        );
        assert!(e.check("GET", "http://127.0.0.1:9/", &[], None).is_ok());
        let big = "x".repeat(MAX_REQUEST_BODY + 1);
        assert!(
            e.check("POST", "http://127.0.0.1/", &[], Some(&big))
                .unwrap_err()
                .to_string()
                .contains("larger than")
        );
    }

    #[test]
    fn a_missing_secret_names_the_variable_and_values_are_redacted() {
        let policy = ToolPolicy {
            allow_hosts: vec!["h".into()],
            secrets: vec![patchflow_core::SecretHeader {
                host: "h".into(),
                header: "Authorization".into(),
                env: "TOKEN_X".into(),
            }],
            ..ToolPolicy::default()
        };
        let e = Egress::from_policy(&policy, |_| None).unwrap_err();
        assert!(e.contains("needs the environment variable TOKEN_X"), "{e}");
        let e = Egress::from_policy(&policy, |_| Some("Bearer abc123".into())).unwrap();
        assert_eq!(e.redact("echo Bearer abc123!"), "echo [secret]!");
        assert!(e.is_secret_header("authorization"));
        assert!(!format!("{e:?}").contains("abc123"));
    }
}
