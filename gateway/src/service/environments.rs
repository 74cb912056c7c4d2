//! Saved environments (`/api/environments`, gRPC `*Environment*`, `patchflow env`): a
//! tenant's named setups, which a task names with `environment`. Every door calls these;
//! each takes the caller and the tenant it asked for (`?tenant=`, an admin's only), reads
//! and writes in that tenant only (another tenant's environment answers as a missing one),
//! and lets viewers read, members and admins write.
//!
//! Secrets are sealed here, each in its own context
//! ([`patchflow_platform::secret_box::environment_context`]: tenant, environment, name),
//! before anything stores them; no answer, log line or error carries a value.

use std::collections::BTreeMap;

use chrono::Utc;
use patchflow_api::{EnvironmentBody, EnvironmentInput, ResetCacheAnswer};
use patchflow_core::Secret;
use patchflow_core::environment::{EnvironmentRecord, cache_object_key};
use patchflow_platform::secret_box::environment_context;

use super::TaskService;
use crate::auth::Principal;
use crate::error::ServiceError;

/// What a missing (or another tenant's) environment answers.
fn missing(tenant: &str, name: &str) -> ServiceError {
    ServiceError::Missing(format!("no environment `{name}` in tenant `{tenant}`"))
}

/// The tenant a request acts in: the caller's own, or, for an admin, the one it names.
fn tenant_of(who: &Principal, asked: Option<&str>) -> Result<String, ServiceError> {
    let tenant = who.tenant_for_submit(asked)?;
    if !patchflow_core::auth::is_tenant_name(&tenant) {
        return Err(ServiceError::BadRequest(
            "tenant: 1 to 128 letters, digits, `-`, `_` or `.`".into(),
        ));
    }
    Ok(tenant)
}

/// A name from a route or an RPC, checked as a body's is.
fn checked_name(name: &str) -> Result<&str, ServiceError> {
    patchflow_core::environment::validate_environment_name(name)?;
    Ok(name)
}

impl TaskService {
    /// Seals each secret in its own context, so it opens only as that secret of this
    /// environment of this tenant.
    fn seal_secrets(
        &self,
        tenant: &str,
        name: &str,
        secrets: &BTreeMap<String, Secret>,
    ) -> Result<BTreeMap<String, String>, ServiceError> {
        secrets
            .iter()
            .map(|(k, v)| {
                let sealed = self
                    .config()
                    .secrets
                    .seal_in(v, &environment_context(tenant, name, k))
                    .map_err(ServiceError::Internal)?;
                Ok((k.clone(), sealed))
            })
            .collect()
    }

    /// Creates an environment; `AlreadyExists` when the tenant has one by that name.
    pub async fn create_environment(
        &self,
        who: &Principal,
        tenant: Option<&str>,
        body: EnvironmentBody,
    ) -> Result<EnvironmentRecord, ServiceError> {
        who.must_write()?;
        let tenant = tenant_of(who, tenant)?;
        let EnvironmentInput {
            name,
            repo,
            setup,
            secrets,
        } = body.into_input(None)?;
        let secrets = match &secrets {
            Some(s) => self.seal_secrets(&tenant, &name, s)?,
            None => BTreeMap::new(),
        };
        // Millisecond times: what the store keeps, so the answer equals a later read.
        let now = now_ms();
        let record = EnvironmentRecord {
            tenant,
            name,
            repo,
            setup,
            secrets,
            secrets_version: 1,
            cache_generation: 0,
            created_at: now,
            updated_at: now,
        };
        if !self.store().put_environment(&record, false).await? {
            return Err(ServiceError::AlreadyExists(format!(
                "tenant `{}` has an environment `{}` already (update it with PUT, or delete it first)",
                record.tenant, record.name
            )));
        }
        tracing::info!(tenant = %record.tenant, environment = %record.name, "environment created");
        Ok(record)
    }

    /// The tenant's environments, by name.
    pub async fn list_environments(
        &self,
        who: &Principal,
        tenant: Option<&str>,
    ) -> Result<Vec<EnvironmentRecord>, ServiceError> {
        let tenant = tenant_of(who, tenant)?;
        Ok(self.store().list_environments(&tenant).await?)
    }

    /// One environment; `Missing` when the tenant has none by that name.
    pub async fn get_environment(
        &self,
        who: &Principal,
        tenant: Option<&str>,
        name: &str,
    ) -> Result<EnvironmentRecord, ServiceError> {
        let tenant = tenant_of(who, tenant)?;
        let name = checked_name(name)?;
        self.store()
            .get_environment(&tenant, name)
            .await?
            .ok_or_else(|| missing(&tenant, name))
    }

    /// Replaces an environment's definition (never creates one). Secrets the body gives
    /// replace the stored ones and bump `secrets_version`; a body without `secrets` keeps
    /// them. `created_at` and `cache_generation` are kept.
    pub async fn update_environment(
        &self,
        who: &Principal,
        tenant: Option<&str>,
        name: &str,
        body: EnvironmentBody,
    ) -> Result<EnvironmentRecord, ServiceError> {
        who.must_write()?;
        let tenant = tenant_of(who, tenant)?;
        let name = checked_name(name)?;
        let input = body.into_input(Some(name))?;
        let old = self
            .store()
            .get_environment(&tenant, name)
            .await?
            .ok_or_else(|| missing(&tenant, name))?;
        let (secrets, secrets_version) = match &input.secrets {
            Some(s) => (
                self.seal_secrets(&tenant, name, s)?,
                old.secrets_version + 1,
            ),
            None => (old.secrets.clone(), old.secrets_version),
        };
        let record = EnvironmentRecord {
            tenant,
            name: input.name,
            repo: input.repo,
            setup: input.setup,
            secrets,
            secrets_version,
            cache_generation: old.cache_generation,
            created_at: old.created_at,
            updated_at: now_ms(),
        };
        if !self.store().put_environment(&record, true).await? {
            // Deleted since it was read.
            return Err(missing(&record.tenant, &record.name));
        }
        tracing::info!(tenant = %record.tenant, environment = %record.name, "environment updated");
        Ok(record)
    }

    /// Deletes an environment and its cached states; `Missing` when there is none.
    pub async fn delete_environment(
        &self,
        who: &Principal,
        tenant: Option<&str>,
        name: &str,
    ) -> Result<(), ServiceError> {
        who.must_write()?;
        let tenant = tenant_of(who, tenant)?;
        let name = checked_name(name)?;
        // Its cached states first (a new environment of the same name starts clean).
        let keys = self
            .store()
            .reset_environment_cache(&tenant, name)
            .await?
            .ok_or_else(|| missing(&tenant, name))?;
        if !self.store().delete_environment(&tenant, name).await? {
            return Err(missing(&tenant, name));
        }
        self.delete_cached_states(&tenant, &keys).await;
        tracing::info!(%tenant, environment = %name, "environment deleted");
        Ok(())
    }

    /// Starts the environment's cache over: a new `cache_generation` (so no earlier state
    /// is ever hit), and the states made from it removed from the store and the objects.
    pub async fn reset_environment_cache(
        &self,
        who: &Principal,
        tenant: Option<&str>,
        name: &str,
    ) -> Result<ResetCacheAnswer, ServiceError> {
        who.must_write()?;
        let tenant = tenant_of(who, tenant)?;
        let name = checked_name(name)?;
        let keys = self
            .store()
            .reset_environment_cache(&tenant, name)
            .await?
            .ok_or_else(|| missing(&tenant, name))?;
        self.delete_cached_states(&tenant, &keys).await;
        let record = self
            .store()
            .get_environment(&tenant, name)
            .await?
            .ok_or_else(|| missing(&tenant, name))?;
        tracing::info!(%tenant, environment = %name, removed = keys.len(), generation = record.cache_generation, "environment cache reset");
        Ok(ResetCacheAnswer {
            name: record.name,
            cache_generation: record.cache_generation,
            removed: keys.len() as u64,
        })
    }

    /// Deletes the objects of cache entries already removed from the store. A failure is
    /// logged, not answered: the entries are gone, so nothing reads those objects again.
    async fn delete_cached_states(&self, tenant: &str, keys: &[String]) {
        for key in keys {
            let object = cache_object_key(tenant, key);
            if let Err(e) = self.objects.delete_prefix(&object).await {
                tracing::warn!(error = %e, %object, "cannot delete a cached environment state");
            }
        }
    }

    /// A submission naming `environment` must name one of its tenant's.
    pub(super) async fn check_environment_exists(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<(), ServiceError> {
        if self.store().get_environment(tenant, name).await?.is_none() {
            return Err(ServiceError::Invalid(patchflow_core::ValidationError::new(
                "environment",
                format!("no environment `{name}` in tenant `{tenant}`"),
            )));
        }
        Ok(())
    }
}

/// Now, to the millisecond the store keeps.
fn now_ms() -> chrono::DateTime<Utc> {
    let ms = Utc::now().timestamp_millis();
    chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default()
}
