//! What an S3 answer means for the caller: SDK errors mapped onto [`ObjectError`], with
//! messages that carry the service's code and reason but never a credential.

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};

use crate::objectstore::ObjectError;

/// Maps an SDK error of `op` on `key` (the caller's key, without the URL's prefix) in
/// `bucket`: a missing bucket and a missing key get their own variants.
pub(super) fn sdk_error<E>(
    bucket: &str,
    op: &'static str,
    key: &str,
    err: &SdkError<E, HttpResponse>,
) -> ObjectError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    if err.code() == Some("NoSuchBucket") {
        ObjectError::BucketMissing(bucket.to_string())
    } else if is_not_found(err) {
        ObjectError::NotFound(key.to_string())
    } else {
        ObjectError::Backend {
            op,
            key: key.to_string(),
            message: message_of(err),
        }
    }
}

/// A 200 answer the SDK could not read as the operation's result, and not an `Error`
/// document either (S3 can answer 200 with an `Error` body; the SDK gives those a code).
pub(super) fn ok_but_unreadable<E>(err: &SdkError<E, HttpResponse>) -> bool
where
    E: ProvideErrorMetadata,
{
    matches!(err, SdkError::ServiceError(s) if s.raw().status().as_u16() == 200)
        && err.code().is_none()
}

/// Whether the store answered "no such key/bucket" (a 404, with or without an error body).
pub(super) fn is_not_found<E>(err: &SdkError<E, HttpResponse>) -> bool
where
    E: ProvideErrorMetadata,
{
    matches!(err.code(), Some("NoSuchKey" | "NotFound" | "NoSuchBucket"))
        || err.raw_response().map(|r| r.status().as_u16()) == Some(404)
}

/// What went wrong, for an error message: the service's code and message, or the chain of
/// causes of a transport failure (which name no credentials, unlike a Debug dump of the
/// request).
pub(super) fn message_of<E>(err: &SdkError<E, HttpResponse>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match err {
        SdkError::ServiceError(service) => format!(
            "HTTP {}: {}",
            service.raw().status().as_u16(),
            error_text(err.code(), err.message())
        ),
        other => chain(other),
    }
}

pub(super) fn error_text(code: Option<&str>, message: Option<&str>) -> String {
    match (code, message) {
        (Some(code), Some(message)) if !message.is_empty() => format!("{code}: {message}"),
        (Some(code), _) => code.to_string(),
        (None, Some(message)) if !message.is_empty() => message.to_string(),
        _ => "the service gave no reason".to_string(),
    }
}

/// An error and its sources, `a: b: c`.
pub(super) fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

pub(super) fn io(key: &str, source: std::io::Error) -> ObjectError {
    ObjectError::Io {
        key: key.to_string(),
        source,
    }
}

/// A local file that could not be opened for an upload.
pub(super) fn file_error(
    key: &str,
    err: &aws_smithy_types::byte_stream::error::Error,
) -> ObjectError {
    io(key, std::io::Error::other(chain(err)))
}
