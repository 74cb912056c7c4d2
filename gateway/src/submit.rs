//! Reading a submission at the HTTP doors: the multipart body of `POST /api/tasks` and of
//! the web page's form (its `zip_file` part streamed to a bounded temporary file, its
//! other fields gathered by [`patchflow_api::FormFields`]), and the one step from a
//! [`SubmitBody`] to a spec that lets no refused upload's file linger. The body's types
//! and rules are patchflow-api's; the HTTP API ([`crate::http`]), the page
//! ([`crate::web`]) and gRPC ([`crate::grpc`]) call this module, it calls none of them.

use std::path::PathBuf;

use axum::extract::Multipart;
use axum::http::StatusCode;
use patchflow_api::{FormFields, SubmitBody};
use patchflow_core::{TaskId, TaskSpec};
use tokio::io::AsyncWriteExt;

use crate::error::ServiceError;
use crate::service::{TaskService, Upload};

/// A fresh temporary path for an upload arriving at a door (`prefix` names the door).
pub fn temp_upload_path(prefix: &str) -> PathBuf {
    let id = TaskId::generate();
    std::env::temp_dir().join(format!(
        "{prefix}-{}.zip",
        id.as_str().trim_start_matches("tsk_")
    ))
}

/// Removes a buffered upload that will not be submitted.
pub async fn discard(upload: &Upload) {
    let _ = tokio::fs::remove_file(&upload.path).await;
}

/// The spec a body asks for; a refused body's upload is removed, not left behind.
pub async fn spec_of(body: SubmitBody, upload: Option<&Upload>) -> Result<TaskSpec, ServiceError> {
    match body.into_spec(upload.is_some()) {
        Ok(spec) => Ok(spec),
        Err(e) => {
            if let Some(u) = upload {
                discard(u).await;
            }
            Err(e.into())
        }
    }
}

fn cannot_buffer(e: &std::io::Error) -> ServiceError {
    ServiceError::Internal(format!("cannot buffer the upload: {e}"))
}

/// Reads multipart fields; the `zip_file` part streams to a temporary file, bounded by the
/// upload limit. A browser form sends every field: an empty file part (no file chosen)
/// means "not given". When a later field is refused, the buffered upload is removed.
/// A `csrf` field (the web page's form) is handed back beside the body.
pub async fn read_multipart(
    service: &TaskService,
    mp: Multipart,
) -> Result<(SubmitBody, Option<Upload>, Option<String>), ServiceError> {
    let mut upload: Option<Upload> = None;
    let mut csrf = None;
    match read_parts(service, mp, &mut upload, &mut csrf).await {
        Ok(body) => Ok((body, upload, csrf)),
        Err(e) => {
            if let Some(u) = &upload {
                discard(u).await;
            }
            Err(e)
        }
    }
}

async fn read_parts(
    service: &TaskService,
    mut mp: Multipart,
    upload: &mut Option<Upload>,
    csrf: &mut Option<String>,
) -> Result<SubmitBody, ServiceError> {
    let limit = service.config().max_upload_bytes;
    let mut fields = FormFields::default();
    loop {
        let field = match mp.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                return Err(ServiceError::TooLarge { limit });
            }
            Err(e) => {
                return Err(ServiceError::BadRequest(format!(
                    "invalid multipart body: {}",
                    e.body_text()
                )));
            }
        };
        let name = field.name().unwrap_or_default().to_string();
        if name == "zip_file" {
            let no_file_chosen = field.file_name().is_none_or(str::is_empty);
            let path = temp_upload_path("patchflow-upload");
            let mut file = tokio::fs::File::create(&path)
                .await
                .map_err(|e| cannot_buffer(&e))?;
            let mut bytes = 0u64;
            let mut field = field;
            loop {
                match field.chunk().await {
                    Ok(Some(chunk)) => {
                        bytes += chunk.len() as u64;
                        if bytes > limit {
                            drop(file);
                            let _ = tokio::fs::remove_file(&path).await;
                            return Err(ServiceError::TooLarge { limit });
                        }
                        file.write_all(&chunk)
                            .await
                            .map_err(|e| cannot_buffer(&e))?;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let _ = tokio::fs::remove_file(&path).await;
                        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                            return Err(ServiceError::TooLarge { limit });
                        }
                        return Err(ServiceError::BadRequest(format!(
                            "upload interrupted: {}",
                            e.body_text()
                        )));
                    }
                }
            }
            file.flush()
                .await
                .map_err(|e| ServiceError::Internal(e.to_string()))?;
            drop(file);
            if no_file_chosen && bytes == 0 {
                let _ = tokio::fs::remove_file(&path).await;
                continue;
            }
            if let Some(earlier) = upload.replace(Upload { path, bytes }) {
                // A second `zip_file` part replaces the first, which would otherwise linger.
                discard(&earlier).await;
            }
            continue;
        }
        let text = field
            .text()
            .await
            .map_err(|e| ServiceError::BadRequest(format!("field `{name}`: {}", e.body_text())))?;
        if name == "csrf" {
            *csrf = Some(text);
            continue;
        }
        fields.add(&name, &text)?;
    }
    Ok(fields.finish()?)
}
