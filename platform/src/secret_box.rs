//! Sealing the credentials a task carries (`git_token`), so the task record, the workflow
//! history and the events only ever hold ciphertext: ChaCha20-Poly1305 (ring) under the
//! `secrets_key` setting, with the task id as associated data, so a sealed value opens only
//! for the task it was sealed for. The gateway seals at submit; the worker's fetch opens.
//! A saved environment's secrets are sealed by the same box in a context of their own
//! ([`SecretBox::seal_in`] with [`environment_context`]): a value sealed for a task never
//! opens as an environment's secret, nor one environment's secret as another's.
//!
//! Key: `secrets_key` (32 bytes, base64), the same on every gateway and worker; unset, a
//! key generated once into `<data_dir>/secrets.key` (mode 0600), which serves one machine
//! (`patchflow up`, or a gateway and worker sharing the data dir).

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use patchflow_core::{Secret, TaskId};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

pub const KEY_FILE: &str = "secrets.key";

pub struct SecretBox {
    key: LessSafeKey,
    rng: SystemRandom,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretBox(***)")
    }
}

fn aad(task: &TaskId) -> String {
    format!("patchflow task credential for {}", task.as_str())
}

/// The associated data of a value sealed in a context ([`SecretBox::seal_in`]): its own
/// prefix, so no context can ever be read as a task's associated data, nor a task's as a
/// context.
fn context_aad(context: &str) -> String {
    format!("patchflow sealed in context {context}")
}

/// The context a saved environment's secret is sealed in: it opens only as that secret of
/// that environment of that tenant.
pub fn environment_context(tenant: &str, name: &str, secret: &str) -> String {
    format!("environment:{tenant}/{name}/{secret}")
}

impl SecretBox {
    /// A box over a 32-byte key given as base64.
    pub fn from_key_text(text: &str) -> Result<Self, String> {
        let bytes = STANDARD
            .decode(text.trim())
            .map_err(|_| "secrets_key is not base64".to_string())?;
        let key = UnboundKey::new(&CHACHA20_POLY1305, &bytes)
            .map_err(|_| format!("secrets_key must be 32 bytes, not {}", bytes.len()))?;
        Ok(Self {
            key: LessSafeKey::new(key),
            rng: SystemRandom::new(),
        })
    }

    /// The box of the settings: `secrets_key` if set, else the data dir's key file (made
    /// on first use).
    pub fn from_settings(key: Option<&Secret>, data_dir: &Path) -> Result<Self, String> {
        match key {
            Some(k) => Self::from_key_text(k.expose()),
            None => Self::load_or_create(&data_dir.join(KEY_FILE)),
        }
    }

    /// Reads the key file, or writes a new random key there (0600) if there is none.
    pub fn load_or_create(path: &Path) -> Result<Self, String> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        if let Ok(text) = std::fs::read_to_string(path) {
            return Self::from_key_text(&text).map_err(|e| format!("{}: {e}", path.display()));
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let mut key = [0u8; 32];
        SystemRandom::new()
            .fill(&mut key)
            .map_err(|_| "no randomness for a secrets key".to_string())?;
        let text = STANDARD.encode(key);
        // Written aside, then linked into place: the key file is never seen half-written
        // by another process starting at the same moment (a gateway and a worker).
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
        drop(f);
        let linked = std::fs::hard_link(&tmp, path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {}
            // Another process of this machine made it first: use theirs.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("cannot create {}: {e}", path.display())),
        }
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::from_key_text(&text)
    }

    /// `plain` sealed for `task`: base64 of nonce, ciphertext and tag.
    pub fn seal(&self, plain: &Secret, task: &TaskId) -> Result<String, String> {
        self.seal_with(plain, &aad(task))
    }

    /// What [`Self::seal`] sealed for `task`; an error for anything else (another task,
    /// another key, a changed byte).
    pub fn open(&self, sealed: &str, task: &TaskId) -> Result<Secret, String> {
        self.open_with(sealed, &aad(task)).map_err(|()| {
            "cannot open the task's git_token: it was sealed for another task or under another secrets_key".to_string()
        })
    }

    /// `plain` sealed in `context` (e.g. [`environment_context`]), the context as
    /// associated data: base64 of nonce, ciphertext and tag, as [`Self::seal`] makes. It
    /// opens only with [`Self::open_in`] and the same context.
    pub fn seal_in(&self, plain: &Secret, context: &str) -> Result<String, String> {
        self.seal_with(plain, &context_aad(context))
    }

    /// What [`Self::seal_in`] sealed in `context`; an error for anything else (another
    /// context, a task's sealed value, another key, a changed byte).
    pub fn open_in(&self, sealed: &str, context: &str) -> Result<Secret, String> {
        self.open_with(sealed, &context_aad(context)).map_err(|()| {
            "cannot open the secret: it was sealed for another use or under another secrets_key"
                .to_string()
        })
    }

    /// `plain` sealed with `aad` as associated data: base64 of nonce, ciphertext and tag.
    fn seal_with(&self, plain: &Secret, aad: &str) -> Result<String, String> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng
            .fill(&mut nonce)
            .map_err(|_| "no randomness for a nonce".to_string())?;
        let mut data = plain.expose().as_bytes().to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut data,
            )
            .map_err(|_| "cannot seal".to_string())?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        Ok(STANDARD.encode(out))
    }

    /// What [`Self::seal_with`] sealed with `aad`; `Err` for anything else (the callers say
    /// what it was).
    fn open_with(&self, sealed: &str, aad: &str) -> Result<Secret, ()> {
        let bytes = STANDARD.decode(sealed).map_err(drop)?;
        if bytes.len() < NONCE_LEN {
            return Err(());
        }
        let (nonce, data) = bytes.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(drop)?;
        let mut data = data.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(aad), &mut data)
            .map_err(drop)?;
        String::from_utf8(plain.to_vec())
            .map(Secret::new)
            .map_err(drop)
    }
}

/// A new API token and its public id: `pf_` and 32 random bytes (base64url, 43 characters),
/// and `tok_` and 9 random bytes. The token is shown once; the store keeps its hash.
pub fn new_token() -> Result<(String, Secret), String> {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let rng = SystemRandom::new();
    let mut secret = [0u8; 32];
    let mut id = [0u8; 9];
    rng.fill(&mut secret)
        .and_then(|()| rng.fill(&mut id))
        .map_err(|_| "no randomness for a token".to_string())?;
    Ok((
        format!("tok_{}", URL_SAFE_NO_PAD.encode(id)),
        Secret::new(format!(
            "{}{}",
            patchflow_core::auth::TOKEN_PREFIX,
            URL_SAFE_NO_PAD.encode(secret)
        )),
    ))
}

/// The `Authorization` header value of HTTP Basic auth with a forge token as password
/// (`x-access-token` is the user GitHub expects; GitLab and Gitea take any user name).
pub fn basic_auth_header(token: &Secret) -> Secret {
    basic_auth_header_as("x-access-token", token)
}

/// [`basic_auth_header`] with another user name (GitLab's `oauth2`).
pub fn basic_auth_header_as(user: &str, token: &Secret) -> Secret {
    Secret::new(format!(
        "Authorization: Basic {}",
        STANDARD.encode(format!("{user}:{}", token.expose()))
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_tokens_have_the_contract_shape_and_never_repeat() {
        let (id1, t1) = new_token().unwrap();
        let (id2, t2) = new_token().unwrap();
        assert!(
            patchflow_core::auth::looks_like_token(t1.expose()),
            "{}",
            t1.expose()
        );
        assert_eq!(t1.expose().len(), 3 + 43);
        assert!(id1.starts_with("tok_") && id1.len() == 16, "{id1}");
        assert_ne!(t1, t2);
        assert_ne!(id1, id2);
    }

    #[test]
    fn sealed_values_open_only_for_their_task_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEY_FILE);
        let a = SecretBox::load_or_create(&path).unwrap();
        let again = SecretBox::load_or_create(&path).unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let (t1, t2) = (TaskId::generate(), TaskId::generate());
        let token = Secret::new("ghp_abc123");
        let sealed = a.seal(&token, &t1).unwrap();
        assert!(!sealed.contains("abc123"));
        assert_ne!(sealed, a.seal(&token, &t1).unwrap(), "nonces repeat");
        assert_eq!(again.open(&sealed, &t1).unwrap().expose(), "ghp_abc123");
        // Another task, another key, a flipped byte, garbage: all refused.
        assert!(a.open(&sealed, &t2).is_err());
        let other = SecretBox::load_or_create(&dir.path().join("other.key")).unwrap();
        assert!(other.open(&sealed, &t1).is_err());
        let mut raw = STANDARD.decode(&sealed).unwrap();
        raw[20] ^= 1;
        assert!(a.open(&STANDARD.encode(raw), &t1).is_err());
        for junk in ["", "!!", "AAAA"] {
            assert!(a.open(junk, &t1).is_err());
        }
        assert!(SecretBox::from_key_text("c2hvcnQ=").is_err());
        assert!(SecretBox::from_key_text("not base64 at all").is_err());
    }

    #[test]
    fn environment_secrets_open_only_in_their_context_and_never_as_task_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let b = SecretBox::load_or_create(&dir.path().join(KEY_FILE)).unwrap();
        let ctx = environment_context("team-a", "py", "API_KEY");
        assert_eq!(ctx, "environment:team-a/py/API_KEY");
        let plain = Secret::new("s3cret-value");
        let sealed = b.seal_in(&plain, &ctx).unwrap();
        assert!(!sealed.contains("s3cret"));
        assert_eq!(b.open_in(&sealed, &ctx).unwrap().expose(), "s3cret-value");
        // Another secret, environment or tenant: refused.
        for other in [
            environment_context("team-a", "py", "OTHER"),
            environment_context("team-a", "node", "API_KEY"),
            environment_context("team-b", "py", "API_KEY"),
        ] {
            assert!(b.open_in(&sealed, &other).is_err(), "{other}");
        }
        // A task's sealed value is not an environment secret, and the other way round,
        // even with a context spelled like the task's associated data.
        let task = TaskId::generate();
        let for_task = b.seal(&plain, &task).unwrap();
        assert!(b.open_in(&for_task, &ctx).is_err());
        let task_aad = aad(&task);
        assert!(b.open_in(&for_task, &task_aad).is_err());
        assert!(b.open(&sealed, &task).is_err());
        let spoof = b.seal_in(&plain, &task_aad).unwrap();
        assert!(b.open(&spoof, &task).is_err());
        let err = b.open_in("garbage", &ctx).unwrap_err();
        assert!(!err.contains("git_token"), "{err}");
    }
}
