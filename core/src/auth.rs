//! Who is asking: the API tokens the gateway checks (stored as a hash in `api_tokens`), the
//! roles they carry, and how a token is made and hashed.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::Secret;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Every tenant, and token management.
    Admin,
    /// Its tenant: submit, read, cancel, retry.
    Member,
    /// Its tenant, read only.
    Viewer,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Admin, Role::Member, Role::Viewer];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Member => "member",
            Self::Viewer => "viewer",
        }
    }

    /// Whether the role may submit, cancel and retry.
    pub fn may_write(self) -> bool {
        matches!(self, Self::Admin | Self::Member)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("role must be `admin`, `member` or `viewer`, not `{s}`"))
    }
}

/// A token as stored: everything but the token itself, which only its hash stands for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiToken {
    pub token_id: String,
    pub tenant: String,
    pub role: Role,
    pub name: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
}

impl ApiToken {
    /// Whether the token may be used at `now`: not revoked, not expired.
    pub fn is_live(&self, now: DateTime<Utc>) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|e| now < e)
    }
}

/// Every token starts with this, so a leaked one is easy to spot (secret scanners).
pub const TOKEN_PREFIX: &str = "pf_";

/// The hash a token is stored and looked up by: SHA-256 of the whole token, hex. (A fast
/// hash is right here: tokens are 256 random bits, not passwords to guess.)
pub fn token_hash(token: &Secret) -> String {
    let digest = Sha256::digest(token.expose().as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `name` may name a tenant: 1 to 128 letters, digits, `-`, `_` or `.`.
pub fn is_tenant_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// Whether `text` has a token's shape (`pf_` and at least 43 URL-safe characters): what
/// is looked up at all.
pub fn looks_like_token(text: &str) -> bool {
    text.strip_prefix(TOKEN_PREFIX).is_some_and(|rest| {
        rest.len() >= 43
            && rest.len() <= 256
            && rest
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_read_back_and_hashes_are_stable_and_distinct() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>().unwrap(), r);
        }
        assert!("root".parse::<Role>().is_err());
        assert!(Role::Member.may_write() && !Role::Viewer.may_write());
        let a = Secret::new("pf_aaaa");
        assert_eq!(token_hash(&a), token_hash(&Secret::new("pf_aaaa")));
        assert_ne!(token_hash(&a), token_hash(&Secret::new("pf_aaab")));
        assert_eq!(token_hash(&a).len(), 64);
        let good = format!("pf_{}", "A".repeat(43));
        assert!(looks_like_token(&good));
        for bad in [
            "",
            "pf_",
            "pf_short",
            "xx_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "pf_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA;",
        ] {
            assert!(!looks_like_token(bad), "{bad}");
        }
    }

    #[test]
    fn a_revoked_or_expired_token_is_not_live() {
        let now = Utc::now();
        let mut t = ApiToken {
            token_id: "tok_1".into(),
            tenant: "a".into(),
            role: Role::Member,
            name: "ci".into(),
            created_at: now,
            expires_at: None,
            revoked_at: None,
            last_used_at: None,
        };
        assert!(t.is_live(now));
        t.expires_at = Some(now);
        assert!(!t.is_live(now), "expiry is exclusive");
        t.expires_at = Some(now + chrono::Duration::days(1));
        assert!(t.is_live(now));
        t.revoked_at = Some(now);
        assert!(!t.is_live(now));
    }
}
