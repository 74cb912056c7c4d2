//! The usage report (`GET /api/usage`, gRPC `GetUsage`, `patchflow usage`): tasks, tokens
//! and cost per day, tenant and model, summed by the task store. A member or viewer sees
//! its own tenant; an admin every tenant, or the one it names.

use patchflow_api::{UsageAnswer, UsageRange};
use patchflow_platform::db::UsageQuery;

use super::TaskService;
use crate::auth::Principal;
use crate::error::ServiceError;

impl TaskService {
    /// The caller's report over `from`..`to` (as given: see [`UsageRange::parse`]);
    /// `tenant` narrows an admin's to one tenant, and a member or viewer may name only its
    /// own.
    pub async fn usage(
        &self,
        who: &Principal,
        tenant: Option<&str>,
        from: Option<&str>,
        to: Option<&str>,
    ) -> Result<UsageAnswer, ServiceError> {
        let range =
            UsageRange::parse(from, to, chrono::Utc::now()).map_err(ServiceError::BadRequest)?;
        let tenant = match tenant.map(str::trim).filter(|t| !t.is_empty()) {
            Some(t) if !patchflow_core::auth::is_tenant_name(t) => {
                return Err(ServiceError::BadRequest(
                    "tenant: 1 to 128 letters, digits, `-`, `_` or `.`".into(),
                ));
            }
            Some(t) => Some(who.tenant_for_submit(Some(t))?),
            None if who.is_admin() => None,
            None => Some(who.tenant.clone()),
        };
        let days = self
            .store()
            .usage(&UsageQuery {
                tenant: tenant.clone(),
                from: range.from,
                to: range.to,
                default_model: self.config().default_model.clone(),
            })
            .await?;
        let tenants = match tenant {
            Some(t) => vec![t],
            None => {
                let mut seen: Vec<String> = days.iter().map(|d| d.tenant.clone()).collect();
                seen.sort();
                seen.dedup();
                seen
            }
        };
        Ok(UsageAnswer::new(range, tenants, days))
    }
}
