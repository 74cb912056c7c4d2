//! A scripted OIDC provider, the stand-in for an identity provider in the tests of
//! `auth = "jwt"`: it generates signing keys (ES256 and EdDSA), serves their public halves
//! as a JWKS, and signs whatever claims a test asks for. It counts fetches and can be
//! taken down, so caching and outages are testable.
// A test double: a key it cannot make or a token it cannot sign is a broken test machine,
// and a panic says so best.
#![allow(clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _,
};
use serde_json::{Value, json};

use crate::lock;

/// The `iss` of every token it signs.
pub const ISSUER: &str = "https://issuer.patchflow.test";
/// The `aud` of every token it signs.
pub const AUDIENCE: &str = "patchflow";

/// A signing key: its id, algorithm, private half and public JWK.
struct Key {
    kid: String,
    alg: Algorithm,
    private: EncodingKey,
    public: Jwk,
}

impl Key {
    fn generate(kid: &str, alg: Algorithm) -> Self {
        let rng = SystemRandom::new();
        let (private, mut public) = match alg {
            Algorithm::EdDSA => {
                // A PKCS#8 v1 document (the form aws-lc reads) around a random seed, and
                // the public key ring derives from that seed.
                let seed: [u8; 32] = ring::rand::generate(&rng).expect("a seed").expose();
                let mut pkcs8 = vec![
                    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04,
                    0x22, 0x04, 0x20,
                ];
                pkcs8.extend_from_slice(&seed);
                let pair = Ed25519KeyPair::from_seed_unchecked(&seed).expect("an Ed25519 key");
                let x = URL_SAFE_NO_PAD.encode(pair.public_key().as_ref());
                let jwk: Jwk = serde_json::from_value(
                    json!({"kty": "OKP", "crv": "Ed25519", "x": x, "alg": "EdDSA"}),
                )
                .expect("an Ed25519 JWK");
                (EncodingKey::from_ed_der(&pkcs8), jwk)
            }
            _ => {
                let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                    .expect("a P-256 key");
                let private = EncodingKey::from_ec_der(pkcs8.as_ref());
                let jwk = Jwk::from_encoding_key(&private, alg).expect("the public JWK");
                (private, jwk)
            }
        };
        public.common.key_id = Some(kid.to_string());
        Self {
            kid: kid.to_string(),
            alg,
            private,
            public,
        }
    }

    fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.private).expect("a signed token")
    }
}

#[derive(Default)]
struct Shared {
    /// Published keys; the last one signs.
    keys: std::sync::Mutex<Vec<Key>>,
    fetches: AtomicUsize,
    down: AtomicBool,
}

/// A running provider on a loopback port.
pub struct TestIssuer {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl TestIssuer {
    /// Starts serving `/jwks` with one ES256 key, `k1`.
    pub async fn start() -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        lock(&shared.keys).push(Key::generate("k1", Algorithm::ES256));
        let app = Router::new()
            .route("/jwks", get(jwks))
            .with_state(shared.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "test OIDC provider stopped");
            }
        });
        Ok(Self { addr, shared })
    }

    pub fn jwks_url(&self) -> String {
        format!("http://{}/jwks", self.addr)
    }

    /// Claims of a token for `tenant` with `role`, valid for `ttl_secs` (negative: expired
    /// that long ago), from this issuer to patchflow.
    pub fn claims(tenant: &str, role: &str, ttl_secs: i64) -> Value {
        let now = now();
        json!({
            "iss": ISSUER, "aud": AUDIENCE, "sub": format!("user-of-{tenant}"),
            "tenant": tenant, "role": role, "iat": now, "exp": now + ttl_secs,
        })
    }

    /// `claims` signed with the current key.
    pub fn sign(&self, claims: &Value) -> String {
        lock(&self.shared.keys).last().expect("a key").sign(claims)
    }

    /// `claims` signed by a key this provider never published, under the current key's id.
    pub fn forge(&self, claims: &Value) -> String {
        let kid = lock(&self.shared.keys).last().expect("a key").kid.clone();
        Key::generate(&kid, Algorithm::ES256).sign(claims)
    }

    /// Publishes a new key (`alg`: ES256 or EdDSA), which signs from now on; with `retire`,
    /// the older keys are no longer published.
    pub fn rotate(&self, kid: &str, alg: Algorithm, retire: bool) {
        let mut keys = lock(&self.shared.keys);
        if retire {
            keys.clear();
        }
        keys.push(Key::generate(kid, alg));
    }

    /// While down, `/jwks` answers 503.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
    }

    /// How many times `/jwks` was asked for.
    pub fn fetches(&self) -> usize {
        self.shared.fetches.load(Ordering::SeqCst)
    }
}

async fn jwks(State(shared): State<Arc<Shared>>) -> Response {
    shared.fetches.fetch_add(1, Ordering::SeqCst);
    if shared.down.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "down for the test").into_response();
    }
    let set = JwkSet {
        keys: lock(&shared.keys)
            .iter()
            .map(|k| k.public.clone())
            .collect(),
    };
    axum::Json(set).into_response()
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
