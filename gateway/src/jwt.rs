//! `auth = "jwt"`: bearer JWTs from an OIDC provider. The signing keys come from the
//! provider's JWKS URL and are cached; a token's signature, `exp`, `nbf`, `iss` and `aud`
//! are checked by `jsonwebtoken`, and its tenant and role are read from two claims.
//!
//! Only asymmetric keys are believed (RSA, PS, EC P-256/P-384, Ed25519): a JWKS publishes
//! public keys, so an `oct` key or an `HS*`/`none` header is refused, which also closes the
//! "sign HS256 with the public key" confusion.

use std::str::FromStr;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use patchflow_core::auth::Role;
use serde_json::{Map, Value};
use tokio::sync::{Mutex, RwLock};

/// How long fetched keys are used before they are fetched again.
pub const JWKS_TTL: Duration = Duration::from_secs(600);
/// Least time between two fetches (a token naming an unknown `kid` asks for one), so a
/// stream of made-up key ids cannot make the gateway hammer the provider.
pub const JWKS_MIN_REFETCH: Duration = Duration::from_secs(10);
/// Largest JWKS document read.
const JWKS_MAX_BYTES: usize = 1024 * 1024;
/// Longest a JWKS fetch may take.
const JWKS_TIMEOUT: Duration = Duration::from_secs(5);
/// Clock skew allowed on `exp` and `nbf`, in seconds.
const LEEWAY_SECS: u64 = 30;
/// Longest token looked at.
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// What `auth_jwt_*` say.
#[derive(Debug, Clone)]
pub struct JwtSettings {
    pub jwks_url: String,
    pub issuer: String,
    pub audience: String,
    /// Claim naming the tenant (a top-level name, or a dotted path into nested objects).
    pub tenant_claim: String,
    /// Claim naming the role: a string or a list of strings; the most privileged
    /// `admin`/`member`/`viewer` in it counts, and a token with none of them is a viewer.
    pub role_claim: String,
}

/// Who a checked JWT stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtIdentity {
    pub tenant: String,
    pub role: Role,
    /// `sub`, when the token has one.
    pub subject: Option<String>,
    /// `exp`, as seconds since the epoch.
    pub expires_at: i64,
}

/// Why a JWT was refused. Every variant is a `401`, but for `KeysUnavailable` (`503`:
/// the token may be fine, the provider is not reachable).
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("cannot fetch the signing keys from auth_jwt_jwks_url: {0}")]
    KeysUnavailable(String),
}

/// A key of the JWKS, with the algorithms a token signed by it may name.
struct Key {
    kid: Option<String>,
    key: DecodingKey,
    algorithms: Vec<Algorithm>,
}

/// When the JWKS was last asked for: by any caller, and because a token named a key
/// the cache did not have.
#[derive(Default)]
struct FetchClock {
    attempt: Option<Instant>,
    for_unknown_key: Option<Instant>,
}

#[derive(Default)]
struct KeySet {
    keys: Vec<Key>,
    fetched: Option<Instant>,
}

impl KeySet {
    /// Whether the keys were fetched within `JWKS_TTL`.
    fn is_fresh(&self) -> bool {
        self.fetched.is_some_and(|at| at.elapsed() <= JWKS_TTL)
    }
}

/// Checks bearer JWTs against one provider.
pub struct JwtVerifier {
    settings: JwtSettings,
    http: reqwest::Client,
    keys: RwLock<KeySet>,
    /// Held while fetching, so concurrent misses fetch once.
    fetching: Mutex<FetchClock>,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("jwks_url", &self.settings.jwks_url)
            .field("issuer", &self.settings.issuer)
            .finish_non_exhaustive()
    }
}

impl JwtVerifier {
    pub fn new(settings: JwtSettings) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .timeout(JWKS_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("cannot build the JWKS client: {e}"))?;
        Ok(Self {
            settings,
            http,
            keys: RwLock::default(),
            fetching: Mutex::default(),
        })
    }

    /// Checks `token` and reads who it stands for.
    pub async fn verify(&self, token: &str) -> Result<JwtIdentity, JwtError> {
        let invalid = |m: &str| JwtError::Invalid(m.to_string());
        if token.len() > MAX_TOKEN_BYTES {
            return Err(invalid("longer than 16 KiB"));
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| JwtError::Invalid(format!("not a JWT ({e})")))?;
        if !is_asymmetric(header.alg) {
            return Err(JwtError::Invalid(format!(
                "alg {:?} is not accepted: only provider-signed (RS, PS, ES, EdDSA) tokens are",
                header.alg
            )));
        }
        let kid = header.kid.as_deref();
        let fresh = self.keys.read().await.is_fresh();
        if !fresh {
            self.refresh(false).await?;
        }
        let claims = match self.check(token, kid, header.alg).await {
            Some(result) => result?,
            None => {
                // A key we do not have: the provider may have rotated. Fetch again (at
                // most every JWKS_MIN_REFETCH) and try once more.
                self.refresh(true).await?;
                self.check(token, kid, header.alg).await.ok_or_else(|| {
                    JwtError::Invalid(match kid {
                        Some(k) => format!("no signing key `{k}` for alg {:?}", header.alg),
                        None => format!("no signing key for alg {:?}", header.alg),
                    })
                })??
            }
        };
        self.identity(&claims)
    }

    /// The token's claims, checked against the cached key it names; `None` when no cached
    /// key fits (fetched too long ago, or never).
    async fn check(
        &self,
        token: &str,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Option<Result<Map<String, Value>, JwtError>> {
        let keys = self.keys.read().await;
        if !keys.is_fresh() {
            return None;
        }
        let mut candidates = keys
            .keys
            .iter()
            .filter(|k| k.algorithms.contains(&alg) && (kid.is_none() || k.kid.as_deref() == kid));
        let first = candidates.next()?;
        let mut v = Validation::new(alg);
        v.leeway = LEEWAY_SECS;
        v.validate_nbf = true;
        v.set_issuer(&[&self.settings.issuer]);
        v.set_audience(&[&self.settings.audience]);
        v.set_required_spec_claims(&["exp", "iss", "aud"]);
        let decode = |key: &Key| {
            jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &v).map(|d| d.claims)
        };
        // A token without `kid` may be signed by any key of its algorithm.
        let mut result = decode(first);
        for key in candidates {
            if result.is_ok() {
                break;
            }
            result = decode(key);
        }
        Some(result.map_err(|e| JwtError::Invalid(e.to_string())))
    }

    /// Fetches the JWKS. `for_unknown_key`: a token named a key the cache lacks (the
    /// provider may have rotated), at most once per `JWKS_MIN_REFETCH`; otherwise the
    /// cached keys are stale or absent, and a failed attempt is not repeated within that
    /// interval either. A failed fetch keeps the keys there were.
    async fn refresh(&self, for_unknown_key: bool) -> Result<(), JwtError> {
        let mut clock = self.fetching.lock().await;
        let recent = |at: Option<Instant>| at.is_some_and(|t| t.elapsed() < JWKS_MIN_REFETCH);
        let skip = if for_unknown_key {
            recent(clock.for_unknown_key)
        } else {
            // Another caller may have fetched while this one waited for the lock.
            let fresh = self.keys.read().await.is_fresh();
            fresh || recent(clock.attempt)
        };
        if skip {
            return if self.keys.read().await.keys.is_empty() {
                Err(JwtError::KeysUnavailable(
                    "the last fetch failed; trying again shortly".into(),
                ))
            } else {
                Ok(())
            };
        }
        clock.attempt = Some(Instant::now());
        if for_unknown_key {
            clock.for_unknown_key = clock.attempt;
        }
        match self.fetch().await {
            Ok(keys) => {
                tracing::info!(keys = keys.len(), url = %self.settings.jwks_url, "fetched the JWKS");
                *self.keys.write().await = KeySet {
                    keys,
                    fetched: Some(Instant::now()),
                };
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, url = %self.settings.jwks_url, "cannot fetch the JWKS");
                let mut keys = self.keys.write().await;
                if keys.keys.is_empty() {
                    return Err(JwtError::KeysUnavailable(e));
                }
                // Keep believing the keys we had for another while rather than lock
                // everyone out while the provider is down.
                keys.fetched = Some(Instant::now());
                Ok(())
            }
        }
    }

    async fn fetch(&self) -> Result<Vec<Key>, String> {
        let mut resp = self
            .http
            .get(&self.settings.jwks_url)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| e.without_url().to_string())?;
        if !resp.status().is_success() {
            return Err(format!("the JWKS URL answered {}", resp.status()));
        }
        if resp
            .content_length()
            .is_some_and(|n| n > JWKS_MAX_BYTES as u64)
        {
            return Err("the JWKS is larger than 1 MiB".into());
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| e.without_url().to_string())?
        {
            body.extend_from_slice(&chunk);
            if body.len() > JWKS_MAX_BYTES {
                return Err("the JWKS is larger than 1 MiB".into());
            }
        }
        parse_jwks(&body)
    }

    fn identity(&self, claims: &Map<String, Value>) -> Result<JwtIdentity, JwtError> {
        let s = &self.settings;
        let tenant = match claim(claims, &s.tenant_claim) {
            Some(Value::String(t)) => t.clone(),
            Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
                a[0].as_str().unwrap_or_default().to_string()
            }
            Some(_) => {
                return Err(JwtError::Invalid(format!(
                    "claim `{}` must name one tenant",
                    s.tenant_claim
                )));
            }
            None => {
                return Err(JwtError::Invalid(format!(
                    "no `{}` claim: the token names no tenant",
                    s.tenant_claim
                )));
            }
        };
        if !patchflow_core::auth::is_tenant_name(&tenant) {
            return Err(JwtError::Invalid(format!(
                "claim `{}`: a tenant is 1 to 128 letters, digits, `-`, `_` or `.`",
                s.tenant_claim
            )));
        }
        let roles: Vec<&str> = match claim(claims, &s.role_claim) {
            Some(Value::String(r)) => vec![r.as_str()],
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        let role = [Role::Admin, Role::Member]
            .into_iter()
            .find(|r| roles.contains(&r.as_str()))
            .unwrap_or(Role::Viewer);
        let subject = claims
            .get("sub")
            .and_then(Value::as_str)
            .map(|s| s.chars().take(200).collect());
        let expires_at = claims.get("exp").and_then(Value::as_i64).unwrap_or(0);
        Ok(JwtIdentity {
            tenant,
            role,
            subject,
            expires_at,
        })
    }
}

/// `name` in `claims`: the top-level claim of that name (names such as
/// `https://example.com/tenant` have dots of their own), else the dotted path.
fn claim<'a>(claims: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    if let Some(v) = claims.get(name) {
        return Some(v);
    }
    let mut parts = name.split('.');
    let mut v = claims.get(parts.next()?)?;
    for p in parts {
        v = v.as_object()?.get(p)?;
    }
    Some(v)
}

fn is_asymmetric(alg: Algorithm) -> bool {
    !matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

/// The signing keys of a JWKS document. A key that cannot be read, is for encryption, or
/// is symmetric is skipped; a document with no usable key is an error.
fn parse_jwks(body: &[u8]) -> Result<Vec<Key>, String> {
    #[derive(serde::Deserialize)]
    struct Doc {
        keys: Vec<Value>,
    }
    let doc: Doc =
        serde_json::from_slice(body).map_err(|e| format!("the JWKS is not a JWK set: {e}"))?;
    let keys: Vec<Key> = doc
        .keys
        .into_iter()
        .filter_map(|v| serde_json::from_value::<Jwk>(v).ok())
        .filter_map(|jwk| {
            let algorithms = algorithms_of(&jwk);
            if algorithms.is_empty() {
                return None;
            }
            let key = DecodingKey::from_jwk(&jwk).ok()?;
            Some(Key {
                kid: jwk.common.key_id,
                key,
                algorithms,
            })
        })
        .collect();
    if keys.is_empty() {
        return Err(
            "the JWKS holds no signing key patchflow can use (RSA, EC P-256/P-384, Ed25519)".into(),
        );
    }
    Ok(keys)
}

/// The algorithms a token signed with `jwk` may name: the key's own `alg` if it has one,
/// else every signature algorithm of its type. Empty: not a signing key we believe.
fn algorithms_of(jwk: &Jwk) -> Vec<Algorithm> {
    if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
        return Vec::new();
    }
    let of_type: Vec<Algorithm> = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => vec![
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ],
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => vec![Algorithm::ES256],
            EllipticCurve::P384 => vec![Algorithm::ES384],
            _ => Vec::new(),
        },
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            vec![Algorithm::EdDSA]
        }
        _ => Vec::new(),
    };
    match jwk.common.key_algorithm {
        None => of_type,
        Some(KeyAlgorithm::UNKNOWN_ALGORITHM) => Vec::new(),
        Some(a) => Algorithm::from_str(&format!("{a:?}"))
            .ok()
            .filter(|a| of_type.contains(a))
            .into_iter()
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claims(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            other => panic!("not an object: {other}"),
        }
    }

    #[test]
    fn claims_are_found_by_name_then_by_path() {
        let c = claims(json!({
            "https://example.com/tenant": "acme",
            "realm_access": {"roles": ["viewer", "admin"]},
            "org": {"id": "o1"}
        }));
        assert_eq!(
            claim(&c, "https://example.com/tenant"),
            Some(&json!("acme"))
        );
        assert_eq!(claim(&c, "org.id"), Some(&json!("o1")));
        assert_eq!(claim(&c, "realm_access.roles.0"), None);
        assert_eq!(claim(&c, "missing.path"), None);
    }

    #[test]
    fn only_signing_keys_of_a_known_type_are_believed() {
        let set = json!({"keys": [
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
            {"kty": "EC", "crv": "P-256", "use": "enc", "kid": "enc",
             "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
             "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
            {"kty": "EC", "crv": "P-256", "kid": "wrong-alg", "alg": "RS256",
             "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
             "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
            {"kty": "weird"},
            {"kty": "EC", "crv": "P-256", "kid": "good",
             "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
             "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}
        ]});
        let keys = parse_jwks(set.to_string().as_bytes()).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].kid.as_deref(), Some("good"));
        assert_eq!(keys[0].algorithms, vec![Algorithm::ES256]);
        let only_bad = json!({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]});
        assert!(parse_jwks(only_bad.to_string().as_bytes()).is_err());
        assert!(parse_jwks(b"<html>").is_err());
    }

    fn verifier(tenant_claim: &str, role_claim: &str) -> JwtVerifier {
        JwtVerifier::new(JwtSettings {
            jwks_url: "http://127.0.0.1:9/jwks".into(),
            issuer: "iss".into(),
            audience: "aud".into(),
            tenant_claim: tenant_claim.into(),
            role_claim: role_claim.into(),
        })
        .unwrap()
    }

    #[test]
    fn tenant_and_role_come_from_their_claims_and_a_missing_role_is_a_viewer() {
        let v = verifier("org.tenant", "roles");
        let id = v
            .identity(&claims(json!({
                "org": {"tenant": "acme"}, "roles": ["viewer", "member", "root"],
                "sub": "u1", "exp": 5
            })))
            .unwrap();
        assert_eq!(
            (
                id.tenant.as_str(),
                id.role,
                id.subject.as_deref(),
                id.expires_at
            ),
            ("acme", Role::Member, Some("u1"), 5)
        );
        let id = v
            .identity(&claims(json!({"org": {"tenant": "acme"}, "roles": "root"})))
            .unwrap();
        assert_eq!(id.role, Role::Viewer, "an unknown role grants nothing");
        for bad in [
            json!({}),
            json!({"org": {"tenant": ""}}),
            json!({"org": {"tenant": "../etc"}}),
            json!({"org": {"tenant": ["a", "b"]}}),
            json!({"org": {"tenant": 7}}),
        ] {
            assert!(v.identity(&claims(bad.clone())).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_symmetric_or_unsigned_token_is_refused_before_any_key_is_fetched() {
        let v = verifier("tenant", "role");
        // HS256 "signed" with anything, and an unsecured `none` token.
        for token in [
            "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJ0ZW5hbnQiOiJhIn0.c2ln",
            "eyJhbGciOiJub25lIn0.eyJ0ZW5hbnQiOiJhIn0.",
            "not-a-jwt",
        ] {
            let e = v.verify(token).await.unwrap_err();
            assert!(matches!(e, JwtError::Invalid(_)), "{token}: {e}");
        }
        let huge = "a".repeat(MAX_TOKEN_BYTES + 1);
        assert!(matches!(v.verify(&huge).await, Err(JwtError::Invalid(_))));
    }

    mod against_a_provider {
        use super::super::*;
        use jsonwebtoken::Algorithm;
        use patchflow_scripted_model::oidc::{AUDIENCE, ISSUER, TestIssuer};
        use serde_json::json;

        fn verifier_of(issuer: &TestIssuer) -> JwtVerifier {
            JwtVerifier::new(JwtSettings {
                jwks_url: issuer.jwks_url(),
                issuer: ISSUER.into(),
                audience: AUDIENCE.into(),
                tenant_claim: "tenant".into(),
                role_claim: "role".into(),
            })
            .unwrap()
        }

        fn with(
            mut claims: serde_json::Value,
            key: &str,
            value: serde_json::Value,
        ) -> serde_json::Value {
            if value.is_null() {
                claims.as_object_mut().unwrap().remove(key);
            } else {
                claims[key] = value;
            }
            claims
        }

        #[tokio::test]
        async fn a_provider_signed_token_names_its_tenant_and_role_and_keys_are_fetched_once() {
            let idp = TestIssuer::start().await.unwrap();
            let v = verifier_of(&idp);
            for _ in 0..3 {
                let id = v
                    .verify(&idp.sign(&TestIssuer::claims("acme", "member", 600)))
                    .await
                    .unwrap();
                assert_eq!((id.tenant.as_str(), id.role), ("acme", Role::Member));
                assert_eq!(id.subject.as_deref(), Some("user-of-acme"));
            }
            assert_eq!(idp.fetches(), 1, "the JWKS is cached");
        }

        #[tokio::test]
        async fn wrong_issuer_audience_times_or_signature_are_refused() {
            let idp = TestIssuer::start().await.unwrap();
            let v = verifier_of(&idp);
            let good = TestIssuer::claims("acme", "admin", 600);
            let now = good["iat"].as_i64().unwrap();
            let cases = [
                (
                    "issuer",
                    idp.sign(&with(good.clone(), "iss", json!("https://evil.test"))),
                ),
                (
                    "audience",
                    idp.sign(&with(good.clone(), "aud", json!("someone-else"))),
                ),
                (
                    "no audience",
                    idp.sign(&with(good.clone(), "aud", json!(null))),
                ),
                (
                    "no issuer",
                    idp.sign(&with(good.clone(), "iss", json!(null))),
                ),
                (
                    "expired",
                    idp.sign(&TestIssuer::claims("acme", "admin", -3600)),
                ),
                ("no exp", idp.sign(&with(good.clone(), "exp", json!(null)))),
                (
                    "not yet",
                    idp.sign(&with(good.clone(), "nbf", json!(now + 3600))),
                ),
                ("forged", idp.forge(&good)),
                ("tampered", {
                    let t = idp.sign(&TestIssuer::claims("acme", "viewer", 600));
                    let mut parts: Vec<String> = t.split('.').map(str::to_string).collect();
                    let admin = idp.sign(&good);
                    parts[1] = admin.split('.').nth(1).unwrap().to_string();
                    parts.join(".")
                }),
            ];
            for (what, token) in cases {
                let e = v.verify(&token).await.unwrap_err();
                assert!(matches!(e, JwtError::Invalid(_)), "{what}: {e}");
            }
            assert!(v.verify(&idp.sign(&good)).await.is_ok());
            assert_eq!(
                idp.fetches(),
                1,
                "a bad signature under a known kid fetches nothing"
            );
        }

        #[tokio::test]
        async fn a_rotated_key_is_fetched_once_and_made_up_key_ids_do_not_hammer_the_provider() {
            let idp = TestIssuer::start().await.unwrap();
            let v = verifier_of(&idp);
            let claims = TestIssuer::claims("acme", "member", 600);
            v.verify(&idp.sign(&claims)).await.unwrap();
            idp.rotate("k2", Algorithm::EdDSA, true);
            let id = v.verify(&idp.sign(&claims)).await.unwrap();
            assert_eq!(id.tenant, "acme");
            assert_eq!(idp.fetches(), 2);
            // A key id nobody published, again and again: at most one fetch per interval.
            for i in 0..5 {
                idp.rotate(&format!("bogus{i}"), Algorithm::ES256, false);
                let t = idp.forge(&claims);
                assert!(v.verify(&t).await.is_err());
            }
            assert_eq!(idp.fetches(), 2, "refetches are spaced by JWKS_MIN_REFETCH");
        }

        #[tokio::test]
        async fn a_provider_that_is_down_is_unavailable_not_a_bad_token_and_cached_keys_carry_on() {
            let idp = TestIssuer::start().await.unwrap();
            idp.set_down(true);
            let v = verifier_of(&idp);
            let token = idp.sign(&TestIssuer::claims("acme", "member", 600));
            let e = v.verify(&token).await.unwrap_err();
            assert!(matches!(e, JwtError::KeysUnavailable(_)), "{e}");
            assert!(e.to_string().contains("503"), "{e}");

            let idp = TestIssuer::start().await.unwrap();
            let v = verifier_of(&idp);
            let token = idp.sign(&TestIssuer::claims("acme", "member", 600));
            v.verify(&token).await.unwrap();
            idp.set_down(true);
            v.verify(&token).await.unwrap();
        }
    }
}
