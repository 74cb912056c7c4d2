//! Per-tenant quotas (`[tenants.NAME]` tables, `[tenants."*"]` for everyone else): which
//! models a tenant may use and caps on its limits, checked at submit; `max_running`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::setting::{Setting, invalid};
use crate::error::CoreError;

/// One tenant's quota; an unset field falls back to the `"*"` entry's, then to no limit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantQuota {
    /// Tasks past QUEUED at once; the rest wait in QUEUED.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_running: Option<u32>,
    /// Model names the tenant may ask for (the default model included only if listed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wall_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    /// Most `candidates` one task may ask for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_candidates: Option<u32>,
    /// Cap on `limits.max_cost_usd`, in US dollars: a task that names none gets this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cost_usd: Option<crate::Usd>,
}

/// Every tenant's quota, by tenant name; `"*"` is the default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TenantQuotas(pub BTreeMap<String, TenantQuota>);

impl TenantQuotas {
    /// The quota that applies to `tenant`: its own fields, the default's where unset.
    pub fn for_tenant(&self, tenant: &str) -> TenantQuota {
        let own = self.0.get(tenant).cloned().unwrap_or_default();
        let any = self.0.get("*").cloned().unwrap_or_default();
        TenantQuota {
            max_running: own.max_running.or(any.max_running),
            models: own.models.or(any.models),
            max_steps: own.max_steps.or(any.max_steps),
            wall_seconds: own.wall_seconds.or(any.wall_seconds),
            max_tokens: own.max_tokens.or(any.max_tokens),
            max_cost_usd: own.max_cost_usd.or(any.max_cost_usd),
            max_candidates: own.max_candidates.or(any.max_candidates),
        }
    }

    /// Each cost cap is an amount a task could be given (see [`crate::Limits::validate`]).
    pub fn validate(&self) -> Result<(), String> {
        for (tenant, q) in &self.0 {
            if let Some(crate::Usd(c)) = q.max_cost_usd
                && !(c.is_finite() && c > 0.0 && c <= 1_000_000.0)
            {
                return Err(format!(
                    "{tenant}.max_cost_usd must be a number of dollars above 0 and at most 1000000"
                ));
            }
        }
        Ok(())
    }
}

/// The text form is JSON (`PATCHFLOW_TENANTS='{"*": {"max_running": 2}}'`); the file
/// takes TOML tables.
impl Setting for TenantQuotas {
    fn parse_text(key: &str, text: &str) -> Result<Self, CoreError> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        let quotas: Self = serde_json::from_str(text)
            .map_err(|e| invalid(key, format!("not a JSON object of tenant quotas: {e}")))?;
        quotas.validate().map_err(|e| invalid(key, e))?;
        Ok(quotas)
    }
    fn to_text(&self) -> Option<String> {
        (!self.0.is_empty()).then(|| serde_json::to_string(self).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_falls_back_to_the_default_field_by_field() {
        let q: TenantQuotas = TenantQuotas::parse_text(
            "tenants",
            r#"{"*": {"max_running": 2, "models": ["a"]}, "big": {"max_running": 10}}"#,
        )
        .unwrap();
        assert_eq!(q.for_tenant("big").max_running, Some(10));
        assert_eq!(q.for_tenant("big").models, Some(vec!["a".to_string()]));
        assert_eq!(q.for_tenant("other").max_running, Some(2));
        assert_eq!(
            TenantQuotas::default().for_tenant("x"),
            TenantQuota::default()
        );
        assert_eq!(
            TenantQuotas::parse_text("tenants", &q.to_text().unwrap()).unwrap(),
            q
        );
        assert!(TenantQuotas::parse_text("tenants", r#"{"*": {"max_runing": 2}}"#).is_err());
        assert!(TenantQuotas::parse_text("tenants", "[1]").is_err());
    }

    #[test]
    fn the_file_takes_tenant_tables_and_prints_them_back() {
        let text = "model = \"m\"\n[tenants.\"*\"]\nmax_running = 2\n[tenants.team-a]\nmodels = [\"m\"]\nmax_steps = 9\n";
        let c = crate::Config::from_toml(text).unwrap();
        assert_eq!(c.tenancy.tenants.for_tenant("team-a").max_steps, Some(9));
        assert_eq!(c.tenancy.tenants.for_tenant("team-a").max_running, Some(2));
        assert_eq!(c.llm.model, "m");
        let again = crate::Config::from_toml(&c.to_redacted_toml()).unwrap();
        assert_eq!(again.tenancy, c.tenancy);
        assert!(crate::Config::from_toml("[tenants.x]\nmax_steps = \"many\"\n").is_err());
    }

    #[test]
    fn a_cost_cap_is_a_positive_amount_from_the_file_or_the_env() {
        let c = crate::Config::from_toml(
            "[tenants.\"*\"]\nmax_cost_usd = 2.5\n[tenants.a]\nmax_steps = 3\n",
        )
        .unwrap();
        assert_eq!(
            c.tenancy.tenants.for_tenant("a").max_cost_usd,
            Some(crate::Usd(2.5))
        );
        for bad in ["0", "-1", "1e7"] {
            let err = crate::Config::from_toml(&format!("[tenants.a]\nmax_cost_usd = {bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("a.max_cost_usd"), "{bad}: {err}");
            let err = TenantQuotas::parse_text(
                "tenants",
                &format!(r#"{{"a": {{"max_cost_usd": {bad}}}}}"#),
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains("a.max_cost_usd"), "{bad}: {err}");
        }
    }
}
