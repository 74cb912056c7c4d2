//! Who is asking, at every door: an `Authorization: Bearer pf_…` token (HTTP, gRPC
//! metadata, the web page's session cookie) is looked up by its hash and becomes a
//! [`Principal`]: a tenant and a role. Every read and write is then scoped to that tenant
//! (an admin's reach is every tenant); another tenant's task answers exactly as a task that
//! does not exist.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chrono::Utc;
use patchflow_core::auth::{ApiToken, Role, looks_like_token, token_hash};
use patchflow_core::config::AuthMode;
use patchflow_core::{Secret, TaskRecord};
use serde::{Deserialize, Serialize};

use crate::error::ServiceError;
use crate::service::TaskService;

/// The file `patchflow up` and `patchflow gateway` write the bootstrap admin token to.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// Sets the bootstrap admin token instead of generating one (deployments: from a Secret).
pub const BOOTSTRAP_TOKEN_ENV: &str = "PATCHFLOW_BOOTSTRAP_TOKEN";
/// The tenant the bootstrap admin token names (an admin reaches every tenant anyway).
pub const ADMIN_TENANT: &str = "default";

/// The caller, as a checked token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principal {
    pub tenant: String,
    pub role: Role,
    pub token_id: String,
}

impl Principal {
    /// Who everyone is when `auth = "none"` (loopback only): an admin.
    pub fn anonymous_admin() -> Self {
        Self {
            tenant: ADMIN_TENANT.into(),
            role: Role::Admin,
            token_id: String::new(),
        }
    }

    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// Whether this caller may see tasks of `tenant`.
    pub fn reaches(&self, tenant: &str) -> bool {
        self.is_admin() || self.tenant == tenant
    }

    /// `Forbidden` unless the role may submit, cancel and retry.
    pub fn must_write(&self) -> Result<(), ServiceError> {
        if self.role.may_write() {
            Ok(())
        } else {
            Err(ServiceError::Forbidden(format!(
                "a {} token may only read",
                self.role
            )))
        }
    }

    /// `Forbidden` unless an admin.
    pub fn must_admin(&self) -> Result<(), ServiceError> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(ServiceError::Forbidden(
                "only an admin token may manage tokens".into(),
            ))
        }
    }

    /// The tenant a submission of this caller belongs to: its own; a non-admin naming
    /// another is refused.
    pub fn tenant_for_submit(&self, asked: Option<&str>) -> Result<String, ServiceError> {
        match asked.map(str::trim).filter(|t| !t.is_empty()) {
            None => Ok(self.tenant.clone()),
            Some(t) if self.reaches(t) => Ok(t.to_string()),
            Some(t) => Err(ServiceError::Forbidden(format!(
                "this token is for tenant `{}`, not `{t}`",
                self.tenant
            ))),
        }
    }
}

/// The token the `Authorization` header (or metadata) value carries.
pub fn bearer(value: Option<&str>) -> Option<&str> {
    let v = value?.trim();
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// How long a checked token is believed without asking the store again: a token revoked
/// through another gateway stops working within this (through this one, at once).
pub const TOKEN_CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(5);
/// Most tokens remembered; past it, the cache starts over.
const TOKEN_CACHE_MAX: usize = 10_000;

/// A checked token: who it stands for, when it expires, when it was checked.
type Checked = (Principal, Option<chrono::DateTime<Utc>>, std::time::Instant);

/// Tokens checked lately, by hash.
#[derive(Default)]
pub struct TokenCache(Mutex<HashMap<String, Checked>>);

impl TokenCache {
    fn get(&self, hash: &str, now: chrono::DateTime<Utc>) -> Option<Principal> {
        let m = self.0.lock().ok()?;
        let (who, expires, at) = m.get(hash)?;
        (at.elapsed() < TOKEN_CACHE_TTL && expires.is_none_or(|e| now < e)).then(|| who.clone())
    }

    fn put(&self, hash: String, who: Principal, expires: Option<chrono::DateTime<Utc>>) {
        if let Ok(mut m) = self.0.lock() {
            if m.len() >= TOKEN_CACHE_MAX {
                m.clear();
            }
            m.insert(hash, (who, expires, std::time::Instant::now()));
        }
    }

    fn forget(&self, token_id: &str) {
        if let Ok(mut m) = self.0.lock() {
            m.retain(|_, (who, _, _)| who.token_id != token_id);
        }
    }
}

/// When each token was last recorded as used, so a busy token writes at most once a minute.
#[derive(Default)]
pub struct UseClock(Mutex<HashMap<String, i64>>);

impl UseClock {
    /// Whether `token_id`'s use now should be written.
    fn due(&self, token_id: &str, now_ms: i64) -> bool {
        let Ok(mut m) = self.0.lock() else {
            return false;
        };
        match m.get(token_id) {
            Some(last) if now_ms - last < 60_000 => false,
            _ => {
                m.insert(token_id.to_string(), now_ms);
                true
            }
        }
    }
}

/// What `POST /api/tokens` answers: the token itself, shown this once.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewToken {
    pub token_id: String,
    pub token: String,
    pub tenant: String,
    pub role: Role,
    pub expires_at: Option<chrono::DateTime<Utc>>,
}

/// The body of `POST /api/tokens`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    pub tenant: String,
    pub role: Role,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub expires_in_days: Option<u32>,
}

/// Longest-lived token (ten years) and longest name.
const MAX_EXPIRY_DAYS: u32 = 3650;
const MAX_NAME_CHARS: usize = 200;

impl TaskService {
    /// The caller an `Authorization` value stands for. `None` or anything that is not a
    /// live token: `Unauthenticated`.
    pub async fn authenticate(
        &self,
        authorization: Option<&str>,
    ) -> Result<Principal, ServiceError> {
        self.authenticate_token(bearer(authorization)).await
    }

    /// The caller a bare token (a bearer value, a session cookie) stands for.
    pub async fn authenticate_token(&self, token: Option<&str>) -> Result<Principal, ServiceError> {
        if self.config().auth == AuthMode::None {
            return Ok(Principal::anonymous_admin());
        }
        let refused = |why: &str| ServiceError::Unauthenticated(why.to_string());
        let Some(token) = token else {
            return Err(refused(
                "authentication required: send `Authorization: Bearer <token>`",
            ));
        };
        let hash = token_hash(&Secret::new(token));
        let now = Utc::now();
        if !looks_like_token(token) {
            return match &self.config().jwt {
                Some(jwt) => self.authenticate_jwt(jwt, token, hash, now).await,
                None => Err(refused("unknown token")),
            };
        }
        if let Some(who) = self.token_cache().get(&hash, now) {
            return Ok(who);
        }
        let Some(t) = self.store().token_by_hash(&hash).await? else {
            return Err(refused("unknown token"));
        };
        if t.revoked_at.is_some() {
            return Err(refused("this token was revoked"));
        }
        if !t.is_live(now) {
            return Err(refused("this token has expired"));
        }
        if self.use_clock().due(&t.token_id, now.timestamp_millis()) {
            let (store, id) = (self.store().clone(), t.token_id.clone());
            tokio::spawn(async move {
                if let Err(e) = store.touch_token(&id).await {
                    tracing::debug!(error = %e, "cannot record a token's use");
                }
            });
        }
        let who = Principal {
            tenant: t.tenant,
            role: t.role,
            token_id: t.token_id,
        };
        self.token_cache().put(hash, who.clone(), t.expires_at);
        Ok(who)
    }

    /// The caller a bearer JWT stands for (`auth = "jwt"`); a checked JWT is remembered as
    /// a token is, until its `exp` at the latest.
    async fn authenticate_jwt(
        &self,
        jwt: &crate::jwt::JwtVerifier,
        token: &str,
        hash: String,
        now: chrono::DateTime<Utc>,
    ) -> Result<Principal, ServiceError> {
        if let Some(who) = self.token_cache().get(&hash, now) {
            return Ok(who);
        }
        let id = jwt.verify(token).await.map_err(|e| match e {
            crate::jwt::JwtError::KeysUnavailable(_) => ServiceError::Unavailable(e.to_string()),
            crate::jwt::JwtError::Invalid(_) => ServiceError::Unauthenticated(e.to_string()),
        })?;
        let who = Principal {
            tenant: id.tenant,
            role: id.role,
            token_id: format!("jwt:{}", id.subject.as_deref().unwrap_or("")),
        };
        let expires = chrono::DateTime::from_timestamp(id.expires_at, 0);
        self.token_cache().put(hash, who.clone(), expires);
        Ok(who)
    }

    /// A task the caller may see; another tenant's is `NotFound`, as a missing one.
    pub async fn get_for(
        &self,
        who: &Principal,
        task_id: &patchflow_core::TaskId,
    ) -> Result<TaskRecord, ServiceError> {
        let r = self.get(task_id).await?;
        if who.reaches(&r.spec.tenant) {
            Ok(r)
        } else {
            Err(ServiceError::NotFound(task_id.clone()))
        }
    }

    /// Makes a token (admin only). The answer holds the token, which nothing keeps.
    pub async fn create_token(
        &self,
        who: &Principal,
        req: TokenRequest,
    ) -> Result<NewToken, ServiceError> {
        who.must_admin()?;
        let tenant = req.tenant.trim();
        if !patchflow_core::auth::is_tenant_name(tenant) {
            return Err(ServiceError::BadRequest(
                "tenant: 1 to 128 letters, digits, `-`, `_` or `.`".into(),
            ));
        }
        if req.name.chars().count() > MAX_NAME_CHARS || req.name.chars().any(char::is_control) {
            return Err(ServiceError::BadRequest(
                "name: at most 200 characters, no control characters".into(),
            ));
        }
        let expires_at = match req.expires_in_days {
            Some(0) | None => None,
            Some(d) if d > MAX_EXPIRY_DAYS => {
                return Err(ServiceError::BadRequest(format!(
                    "expires_in_days: at most {MAX_EXPIRY_DAYS}"
                )));
            }
            Some(d) => Some(Utc::now() + chrono::Duration::days(i64::from(d))),
        };
        let (token, secret) = self
            .mint(tenant, req.role, &req.name, expires_at, None)
            .await?;
        Ok(NewToken {
            token_id: token.token_id,
            token: secret.expose().to_string(),
            tenant: token.tenant,
            role: token.role,
            expires_at: token.expires_at,
        })
    }

    async fn mint(
        &self,
        tenant: &str,
        role: Role,
        name: &str,
        expires_at: Option<chrono::DateTime<Utc>>,
        preset: Option<Secret>,
    ) -> Result<(ApiToken, Secret), ServiceError> {
        let (token_id, fresh) =
            patchflow_platform::secret_box::new_token().map_err(ServiceError::Internal)?;
        let secret = preset.unwrap_or(fresh);
        let token = ApiToken {
            token_id,
            tenant: tenant.to_string(),
            role,
            name: name.to_string(),
            created_at: Utc::now(),
            expires_at,
            revoked_at: None,
            last_used_at: None,
        };
        self.store()
            .create_token(&token, &token_hash(&secret))
            .await?;
        Ok((token, secret))
    }

    /// Every token (admin only); never a token's value.
    pub async fn list_tokens(&self, who: &Principal) -> Result<Vec<ApiToken>, ServiceError> {
        who.must_admin()?;
        Ok(self.store().list_tokens().await?)
    }

    /// Revokes a token (admin only); `NotFound`-like `BadRequest` when there is none.
    pub async fn revoke_token(
        &self,
        who: &Principal,
        token_id: &str,
    ) -> Result<bool, ServiceError> {
        who.must_admin()?;
        self.token_cache().forget(token_id);
        Ok(self.store().revoke_token(token_id).await?)
    }

    /// On a new deployment (no token at all), makes an admin token: the one in
    /// `PATCHFLOW_BOOTSTRAP_TOKEN` if set, else a new one written to
    /// `<data_dir>/admin.token` (mode 0600). Returns the file written, if any. Never logs
    /// or prints the token.
    pub async fn bootstrap_admin(
        &self,
        data_dir: &Path,
        preset: Option<Secret>,
    ) -> Result<Option<PathBuf>, ServiceError> {
        if self.config().auth == AuthMode::None || self.store().count_tokens().await? > 0 {
            return Ok(None);
        }
        if let Some(p) = &preset
            && !looks_like_token(p.expose())
        {
            return Err(ServiceError::BadRequest(format!(
                "{BOOTSTRAP_TOKEN_ENV} must look like a patchflow token: `pf_` and at least 43 URL-safe characters"
            )));
        }
        let from_env = preset.is_some();
        let (_, secret) = self
            .mint(ADMIN_TENANT, Role::Admin, "bootstrap admin", None, preset)
            .await?;
        if from_env {
            return Ok(None);
        }
        let path = data_dir.join(ADMIN_TOKEN_FILE);
        write_private(&path, secret.expose())
            .map_err(|e| ServiceError::Internal(format!("cannot write {}: {e}", path.display())))?;
        Ok(Some(path))
    }
}

/// Writes `text` to a new file only its owner can read.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    f.write_all(b"\n")
}

/// The web page's session cookie: the token itself, HttpOnly and SameSite=Strict, so no
/// script reads it and no other site's page sends it.
pub const SESSION_COOKIE: &str = "pf_session";

/// The CSRF token of a session: derived from the session's token, so only a page that
/// was served to the session holds it (and no store keeps it).
pub fn csrf_of(token: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("patchflow csrf\0{token}").as_bytes());
    digest.iter().take(16).map(|b| format!("{b:02x}")).collect()
}

/// The session token in a request's `Cookie` headers, if any.
pub fn session_token(headers: &axum::http::HeaderMap) -> Option<String> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == SESSION_COOKIE)
        .map(|(_, v)| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// The `Set-Cookie` value that starts a session (`secure` behind TLS) or, with `None`,
/// ends it.
pub fn session_cookie(token: Option<&str>, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    match token {
        Some(t) => format!("{SESSION_COOKIE}={t}; Path=/; HttpOnly; SameSite=Strict{secure}"),
        None => format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_values_are_read_strictly() {
        assert_eq!(bearer(Some("Bearer pf_x")), Some("pf_x"));
        assert_eq!(bearer(Some("bearer   pf_x ")), Some("pf_x"));
        assert_eq!(bearer(Some("Basic abc")), None);
        assert_eq!(bearer(Some("pf_x")), None);
        assert_eq!(bearer(None), None);
    }

    #[test]
    fn principals_reach_their_tenant_and_admins_every_one() {
        let member = Principal {
            tenant: "a".into(),
            role: Role::Member,
            token_id: "t".into(),
        };
        assert!(member.reaches("a") && !member.reaches("b"));
        assert!(member.must_write().is_ok() && member.must_admin().is_err());
        assert_eq!(member.tenant_for_submit(None).unwrap(), "a");
        assert_eq!(member.tenant_for_submit(Some(" a ")).unwrap(), "a");
        assert!(matches!(
            member.tenant_for_submit(Some("b")),
            Err(ServiceError::Forbidden(_))
        ));
        let viewer = Principal {
            role: Role::Viewer,
            ..member
        };
        assert!(viewer.must_write().is_err());
        let admin = Principal::anonymous_admin();
        assert!(admin.reaches("anyone"));
        assert_eq!(admin.tenant_for_submit(Some("b")).unwrap(), "b");
    }

    #[test]
    fn sessions_are_read_from_cookies_and_csrf_tokens_are_bound_to_them() {
        let mut h = axum::http::HeaderMap::new();
        h.append(
            axum::http::header::COOKIE,
            "a=1; pf_session=pf_abc; b=2".parse().unwrap(),
        );
        assert_eq!(session_token(&h).as_deref(), Some("pf_abc"));
        let mut none = axum::http::HeaderMap::new();
        none.append(
            axum::http::header::COOKIE,
            "pf_sessionx=1; pf_session=".parse().unwrap(),
        );
        assert_eq!(session_token(&none), None);
        assert_eq!(csrf_of("pf_a"), csrf_of("pf_a"));
        assert_ne!(csrf_of("pf_a"), csrf_of("pf_b"));
        assert!(!csrf_of("pf_a").contains("pf_a"));
        let c = session_cookie(Some("pf_a"), true);
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && c.ends_with("Secure"));
        assert!(session_cookie(None, false).contains("Max-Age=0"));
    }

    #[test]
    fn cached_tokens_lapse_with_their_expiry_and_when_revoked_here() {
        let c = TokenCache::default();
        let now = Utc::now();
        let who = Principal::anonymous_admin();
        c.put(
            "h".into(),
            who.clone(),
            Some(now + chrono::Duration::seconds(1)),
        );
        assert_eq!(c.get("h", now), Some(who.clone()));
        assert_eq!(
            c.get("h", now + chrono::Duration::seconds(2)),
            None,
            "expired"
        );
        c.put(
            "k".into(),
            Principal {
                token_id: "tok_k".into(),
                ..who
            },
            None,
        );
        c.forget("tok_k");
        assert_eq!(c.get("k", now), None, "revoked");
    }

    #[test]
    fn a_token_use_is_written_at_most_once_a_minute() {
        let c = UseClock::default();
        assert!(c.due("t", 0));
        assert!(!c.due("t", 59_999));
        assert!(c.due("t", 60_000));
        assert!(c.due("u", 1));
    }
}
