//! Issues in: the resolver's doors. `POST /api/webhooks/github` and
//! `POST /api/webhooks/gitlab` start a task from an issue that got the trigger label, or
//! from an issue comment that starts with `/patchflow`. They are authenticated by their
//! signature (GitHub: `X-Hub-Signature-256`, an HMAC-SHA256 of the body; GitLab: the
//! `X-Gitlab-Token` secret), compared in constant time, not by API tokens. The delivery id
//! is the task's idempotency key, so a redelivered hook starts nothing new. The task opens a
//! pull request, and its end is said on the issue (the worker's `change_status`).

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use patchflow_api::SubmitBody;
use patchflow_core::{IssueRef, Secret};
use ring::hmac;
use serde_json::{Value, json};

use crate::error::ServiceError;
use crate::service::TaskService;

/// Largest webhook body read (GitHub caps deliveries at 25 MB; issue events are small).
pub const MAX_WEBHOOK_BYTES: usize = 5 * 1024 * 1024;
/// The comment prefix that starts a task.
pub const COMMAND: &str = "/patchflow";
/// Who may start a task with a GitHub comment (`author_association`).
const TRUSTED_AUTHORS: [&str; 3] = ["OWNER", "MEMBER", "COLLABORATOR"];

/// What the webhook doors need (the `forge` settings).
#[derive(Clone, Default)]
pub struct WebhookSettings {
    pub github_secret: Option<Secret>,
    pub github_label: String,
    pub github_tenant: String,
    pub gitlab_secret: Option<Secret>,
    pub gitlab_label: String,
    pub gitlab_tenant: String,
}

impl std::fmt::Debug for WebhookSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSettings")
            .field("github", &self.github_secret.is_some())
            .field("gitlab", &self.gitlab_secret.is_some())
            .finish_non_exhaustive()
    }
}

/// A task an event asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trigger {
    pub clone_url: String,
    pub default_branch: String,
    pub issue: u64,
    pub description: String,
}

fn answer(code: StatusCode, v: Value) -> Response {
    (code, axum::Json(v)).into_response()
}

fn unauthenticated(why: &str) -> Response {
    answer(
        StatusCode::UNAUTHORIZED,
        json!({"code": "unauthenticated", "error": why, "message": why}),
    )
}

fn ignored(forge: &str, why: &str) -> Response {
    tracing::info!(forge, reason = why, "webhook ignored");
    answer(StatusCode::ACCEPTED, json!({"ignored": why}))
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// Whether `signature` (`sha256=<hex>`) is the HMAC-SHA256 of `body` under `secret`,
/// checked in constant time.
pub fn github_signature_ok(secret: &Secret, body: &[u8], signature: Option<&str>) -> bool {
    let Some(hex_sig) = signature.and_then(|s| s.strip_prefix("sha256=")) else {
        return false;
    };
    let Ok(tag) = hex::decode(hex_sig.trim()) else {
        return false;
    };
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.expose().as_bytes());
    hmac::verify(&key, body, &tag).is_ok()
}

/// Whether `sent` is `secret`, in constant time (both are MACed under a fresh key and the
/// tags compared).
pub fn token_matches(secret: &Secret, sent: Option<&str>) -> bool {
    let Some(sent) = sent else { return false };
    let rng = ring::rand::SystemRandom::new();
    let Ok(key) = hmac::Key::generate(hmac::HMAC_SHA256, &rng) else {
        return false;
    };
    let tag = hmac::sign(&key, secret.expose().as_bytes());
    hmac::verify(&key, sent.as_bytes(), tag.as_ref()).is_ok()
}

fn text(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

/// The task a GitHub event asks for, or why it asks for none.
pub fn github_trigger(event: &str, payload: &Value, label: &str) -> Result<Trigger, String> {
    let issue = &payload["issue"];
    let comment = match (event, payload["action"].as_str()) {
        ("issues", Some("labeled")) => {
            if payload["label"]["name"].as_str() != Some(label) {
                return Err(format!("a label other than `{label}`"));
            }
            None
        }
        ("issue_comment", Some("created")) => {
            let body = text(&payload["comment"]["body"]);
            let Some(rest) = body.trim_start().strip_prefix(COMMAND) else {
                return Err(format!("a comment that does not start with {COMMAND}"));
            };
            // Anyone may comment on a public repository's issue; only its owners, members
            // and collaborators may spend this deployment's model account. (Labels need
            // triage access already.)
            let who = payload["comment"]["author_association"]
                .as_str()
                .unwrap_or("NONE");
            if !TRUSTED_AUTHORS.contains(&who) {
                return Err(format!("a {COMMAND} comment by an outsider ({who})"));
            }
            if !issue["pull_request"].is_null() {
                return Err("a comment on a pull request".into());
            }
            Some(rest.trim().to_string())
        }
        ("ping", _) => return Err("a ping".into()),
        (e, a) => return Err(format!("event `{e}` ({})", a.unwrap_or("no action"))),
    };
    let repo = &payload["repository"];
    trigger(
        text(&repo["clone_url"]),
        text(&repo["default_branch"]),
        issue["number"].as_u64(),
        &text(&issue["title"]),
        &text(&issue["body"]),
        comment.as_deref(),
    )
}

/// The task a GitLab event asks for, or why it asks for none.
pub fn gitlab_trigger(event: &str, payload: &Value, label: &str) -> Result<Trigger, String> {
    let attrs = &payload["object_attributes"];
    let has = |v: &Value| {
        v.as_array()
            .is_some_and(|l| l.iter().any(|x| x["title"].as_str() == Some(label)))
    };
    let (number, title, body, comment) = match event {
        "Issue Hook" => {
            let labels = &payload["changes"]["labels"];
            let added = if labels.is_null() {
                // A new issue opened with the label on.
                attrs["action"].as_str() == Some("open") && has(&payload["labels"])
            } else {
                has(&labels["current"]) && !has(&labels["previous"])
            };
            if !added {
                return Err(format!("no `{label}` label added"));
            }
            (
                attrs["iid"].as_u64(),
                text(&attrs["title"]),
                text(&attrs["description"]),
                None,
            )
        }
        "Note Hook" => {
            if attrs["noteable_type"].as_str() != Some("Issue") {
                return Err("a note on something other than an issue".into());
            }
            let note = text(&attrs["note"]);
            let Some(rest) = note.trim_start().strip_prefix(COMMAND) else {
                return Err(format!("a note that does not start with {COMMAND}"));
            };
            let issue = &payload["issue"];
            (
                issue["iid"].as_u64(),
                text(&issue["title"]),
                text(&issue["description"]),
                Some(rest.trim().to_string()),
            )
        }
        e => return Err(format!("event `{e}`")),
    };
    let project = &payload["project"];
    trigger(
        text(&project["git_http_url"]),
        text(&project["default_branch"]),
        number,
        &title,
        &body,
        comment.as_deref(),
    )
}

fn trigger(
    clone_url: String,
    default_branch: String,
    number: Option<u64>,
    title: &str,
    body: &str,
    comment: Option<&str>,
) -> Result<Trigger, String> {
    let issue = number.ok_or("no issue number")?;
    if clone_url.is_empty() {
        return Err("no repository URL".into());
    }
    let mut description = format!(
        "Resolve issue #{issue}: {}\n\n{}",
        title.trim(),
        body.trim()
    );
    if let Some(c) = comment.filter(|c| !c.is_empty()) {
        description.push_str(&format!("\n\nThe request on the issue: {c}"));
    }
    Ok(Trigger {
        clone_url,
        default_branch,
        issue,
        description: description.trim().to_string(),
    })
}

/// Starts the task a trigger asks for, in `tenant`, keyed by the delivery.
async fn start(
    service: &TaskService,
    forge: &str,
    t: Trigger,
    tenant: &str,
    delivery: Option<&str>,
) -> Response {
    if let Err(e) = service.admit(tenant).await {
        return crate::http::error_of(e);
    }
    let body = SubmitBody {
        git_url: Some(t.clone_url.clone()),
        git_ref: (!t.default_branch.is_empty()).then(|| t.default_branch.clone()),
        task_description: Some(t.description),
        open_pr: true,
        tenant: Some(tenant.to_string()),
        idempotency_key: delivery.map(|d| format!("{forge}-delivery:{d}")),
        ..SubmitBody::default()
    };
    let result = async {
        let mut spec = body.into_spec(false).map_err(ServiceError::from)?;
        spec.issue = Some(IssueRef {
            repo_url: t.clone_url.clone(),
            number: t.issue,
        });
        Ok(service
            .submit_admitted(spec, None, None)
            .await?
            .counted("webhook"))
    }
    .await;
    match result {
        Ok(o) => {
            tracing::info!(forge, task_id = %o.record.task_id, issue = t.issue, repo = %t.clone_url, created = o.created, "webhook started a task");
            let code = if o.created {
                StatusCode::ACCEPTED
            } else {
                StatusCode::OK
            };
            answer(
                code,
                json!({"task_id": o.record.task_id, "status": o.record.status, "created": o.created}),
            )
        }
        Err(e) => crate::http::error_of(e),
    }
}

/// `POST /api/webhooks/github`.
pub async fn github(
    State(service): State<TaskService>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let w = &service.config().webhooks;
    let Some(secret) = &w.github_secret else {
        return answer(
            StatusCode::NOT_FOUND,
            json!({"code": "not_found", "error": "GitHub webhooks are off (github_webhook_secret is unset)"}),
        );
    };
    if !github_signature_ok(secret, &body, header(&headers, "x-hub-signature-256")) {
        tracing::warn!("a GitHub webhook with a missing or wrong signature was refused");
        return unauthenticated("missing or wrong X-Hub-Signature-256");
    }
    let event = header(&headers, "x-github-event").unwrap_or_default();
    let Ok(payload) = serde_json::from_slice::<Value>(&body) else {
        return answer(
            StatusCode::BAD_REQUEST,
            json!({"code": "invalid_request", "error": "the body is not JSON"}),
        );
    };
    match github_trigger(event, &payload, &w.github_label) {
        Ok(t) => {
            let delivery = header(&headers, "x-github-delivery");
            start(&service, "github", t, &w.github_tenant, delivery).await
        }
        Err(why) => ignored("github", &why),
    }
}

/// `POST /api/webhooks/gitlab`.
pub async fn gitlab(
    State(service): State<TaskService>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let w = &service.config().webhooks;
    let Some(secret) = &w.gitlab_secret else {
        return answer(
            StatusCode::NOT_FOUND,
            json!({"code": "not_found", "error": "GitLab webhooks are off (gitlab_webhook_secret is unset)"}),
        );
    };
    if !token_matches(secret, header(&headers, "x-gitlab-token")) {
        tracing::warn!("a GitLab webhook with a missing or wrong token was refused");
        return unauthenticated("missing or wrong X-Gitlab-Token");
    }
    let event = header(&headers, "x-gitlab-event").unwrap_or_default();
    let Ok(payload) = serde_json::from_slice::<Value>(&body) else {
        return answer(
            StatusCode::BAD_REQUEST,
            json!({"code": "invalid_request", "error": "the body is not JSON"}),
        );
    };
    match gitlab_trigger(event, &payload, &w.gitlab_label) {
        Ok(t) => {
            let delivery = header(&headers, "x-gitlab-event-uuid")
                .or_else(|| header(&headers, "idempotency-key"));
            start(&service, "gitlab", t, &w.gitlab_tenant, delivery).await
        }
        Err(why) => ignored("gitlab", &why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn github_signatures_are_checked_against_the_body() {
        let secret = Secret::new("It's a Secret to Everybody");
        // GitHub's documented example.
        let body = b"Hello, World!";
        let good = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert!(github_signature_ok(&secret, body, Some(good)));
        assert!(!github_signature_ok(&secret, b"Hello, World?", Some(good)));
        assert!(!github_signature_ok(
            &Secret::new("other"),
            body,
            Some(good)
        ));
        for bad in [
            None,
            Some(""),
            Some("sha256="),
            Some("sha1=abc"),
            Some("sha256=zz"),
            Some(&good[..20]),
        ] {
            assert!(!github_signature_ok(&secret, body, bad), "{bad:?}");
        }
        assert!(token_matches(&secret, Some("It's a Secret to Everybody")));
        assert!(!token_matches(&secret, Some("It's a Secret to Everybody ")));
        assert!(!token_matches(&secret, None));
    }

    #[test]
    fn only_the_trigger_label_or_command_starts_a_task() {
        let repo = json!({"clone_url": "https://github.com/o/r.git", "default_branch": "main"});
        let issue = json!({"number": 7, "title": "Crash on empty input", "body": "Steps: run it"});
        let labeled = json!({"action": "labeled", "label": {"name": "patchflow"}, "issue": issue, "repository": repo});
        let t = github_trigger("issues", &labeled, "patchflow").unwrap();
        assert_eq!((t.issue, t.default_branch.as_str()), (7, "main"));
        assert!(
            t.description.contains("Crash on empty input")
                && t.description.contains("Steps: run it")
        );
        assert!(github_trigger("issues", &labeled, "other").is_err());
        let comment = json!({"action": "created", "comment": {"body": "/patchflow please add a test", "author_association": "MEMBER"}, "issue": issue, "repository": repo});
        let t = github_trigger("issue_comment", &comment, "patchflow").unwrap();
        assert!(t.description.contains("please add a test"));
        for outsider in ["NONE", "CONTRIBUTOR", "FIRST_TIME_CONTRIBUTOR"] {
            let mut c = comment.clone();
            c["comment"]["author_association"] = json!(outsider);
            assert!(
                github_trigger("issue_comment", &c, "patchflow").is_err(),
                "{outsider}"
            );
        }
        let chatter = json!({"action": "created", "comment": {"body": "thanks /patchflow"}, "issue": issue, "repository": repo});
        assert!(github_trigger("issue_comment", &chatter, "patchflow").is_err());
        let mut on_pr = comment;
        on_pr["issue"]["pull_request"] = json!({"url": "x"});
        assert!(github_trigger("issue_comment", &on_pr, "patchflow").is_err());
        assert!(github_trigger("push", &json!({}), "patchflow").is_err());
        assert!(
            github_trigger(
                "issues",
                &json!({"action": "labeled", "label": {"name": "patchflow"}}),
                "patchflow"
            )
            .is_err()
        );

        let project =
            json!({"git_http_url": "https://gitlab.com/g/r.git", "default_branch": "main"});
        let added = json!({"object_attributes": {"iid": 3, "title": "T", "description": "D", "action": "update"},
            "changes": {"labels": {"previous": [], "current": [{"title": "patchflow"}]}}, "project": project});
        assert_eq!(
            gitlab_trigger("Issue Hook", &added, "patchflow")
                .unwrap()
                .issue,
            3
        );
        let kept = json!({"object_attributes": {"iid": 3, "action": "update"},
            "changes": {"labels": {"previous": [{"title": "patchflow"}], "current": [{"title": "patchflow"}]}}, "project": project});
        assert!(
            gitlab_trigger("Issue Hook", &kept, "patchflow").is_err(),
            "the label was there already"
        );
        let note = json!({"object_attributes": {"noteable_type": "Issue", "note": "/patchflow go"},
            "issue": {"iid": 4, "title": "T", "description": "D"}, "project": project});
        assert_eq!(
            gitlab_trigger("Note Hook", &note, "patchflow")
                .unwrap()
                .issue,
            4
        );
        let mr_note = json!({"object_attributes": {"noteable_type": "MergeRequest", "note": "/patchflow"}, "project": project});
        assert!(gitlab_trigger("Note Hook", &mr_note, "patchflow").is_err());
    }
}
