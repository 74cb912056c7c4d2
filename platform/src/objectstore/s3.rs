//! The object store on an S3-compatible service (AWS S3, Tencent COS, MinIO): the store that
//! gateways and workers on different machines share, where a local directory cannot be.
//!
//! Selected by `s3://BUCKET[/PREFIX]?endpoint=URL&region=REGION&path_style=true|false&create_bucket=true|false`.
//! Credentials come only from the standard AWS chain (`AWS_ACCESS_KEY_ID` /
//! `AWS_SECRET_ACCESS_KEY`, profiles, web identity, ECS, IMDS): never from the URL, never in
//! logs, errors or [`ObjectStore::describe`]. Without `region=` the region comes from the
//! AWS chain (environment, profile, instance metadata), else `us-east-1`. Path-style
//! addressing is the default with an `endpoint=` (MinIO, moto), virtual-host style without
//! (AWS; Tencent COS wants `path_style=false` with its endpoint).
//!
//! Archives can be large, so nothing here holds a whole object in memory: uploads stream from
//! the file (multipart above [`MULTIPART_THRESHOLD`], one part at a time, the upload aborted on
//! any error) and downloads stream into a temporary sibling that is renamed into place, so a
//! reader of the destination sees no torn file. The client has a connect timeout, per-attempt
//! and per-operation timeouts and few retries, so an unreachable store fails an activity in
//! seconds and Temporal's retry policy takes over, instead of the SDK retrying for minutes.

mod errors;
mod multipart;
#[cfg(test)]
mod tests;
mod url;

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_config::meta::region::RegionProviderChain;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::{Region, RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::types::{
    BucketLocationConstraint, CreateBucketConfiguration, Delete, ObjectIdentifier,
};
use aws_smithy_types::byte_stream::{ByteStream, Length};
use tokio::io::AsyncWriteExt;

use super::{FsObjectStore, ObjectError, ObjectMeta, ObjectReader, ObjectStore, validate_key};
use errors::{chain, error_text, file_error, io, is_not_found, message_of, sdk_error};
use multipart::{MULTIPART_THRESHOLD, MultipartUpload, UPLOAD_BUFFER, to_i64};
use url::{S3Url, parse_url};

/// S3's limit on the keys of one `DeleteObjects`, and the page size of `ListObjectsV2`.
const DELETE_BATCH: i32 = 1000;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// One attempt of one request (an 8 MiB part at 70 KiB/s still fits).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(120);
/// One request with its retries. Body streaming of a download is not counted here; the
/// SDK's stalled-stream protection ends a download that stops moving.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(300);
/// Attempts per request, the first included: transient failures are retried briefly here,
/// longer outages are the activity retry policy's business.
const MAX_ATTEMPTS: u32 = 3;
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

const DEFAULT_REGION: &str = "us-east-1";

/// The store on one bucket (and optional key prefix) of an S3-compatible service.
pub struct S3ObjectStore {
    client: Client,
    bucket: String,
    /// Prepended to every key: empty, or ends with `/`.
    prefix: String,
    endpoint: Option<String>,
    region: String,
    path_style: bool,
}

impl S3ObjectStore {
    /// Opens `s3://BUCKET[/PREFIX]?endpoint=URL&region=REGION&path_style=…&create_bucket=…`
    /// with credentials from the standard AWS chain, and checks that the bucket exists
    /// (creating it when `create_bucket=true`).
    pub async fn open(url: &str) -> Result<Self, ObjectError> {
        let parsed = parse_url(url)?;
        let store = Self::connect(&parsed, None).await;
        store.ensure_bucket(parsed.create_bucket).await?;
        Ok(store)
    }

    /// Like [`S3ObjectStore::open`], with fixed keys instead of the AWS chain (for tests and
    /// tools that must leave the process environment untouched).
    pub async fn with_credentials(
        url: &str,
        access_key_id: &str,
        secret_access_key: &str,
    ) -> Result<Self, ObjectError> {
        let parsed = parse_url(url)?;
        let credentials = aws_sdk_s3::config::Credentials::new(
            access_key_id,
            secret_access_key,
            None,
            None,
            "patchflow-test",
        );
        let store = Self::connect(&parsed, Some(credentials)).await;
        store.ensure_bucket(parsed.create_bucket).await?;
        Ok(store)
    }

    /// Builds the client; no request is made.
    async fn connect(url: &S3Url, credentials: Option<aws_sdk_s3::config::Credentials>) -> Self {
        let region = RegionProviderChain::first_try(url.region.clone().map(Region::new))
            .or_default_provider()
            .or_else(Region::new(DEFAULT_REGION));
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .operation_attempt_timeout(ATTEMPT_TIMEOUT)
            .operation_timeout(OPERATION_TIMEOUT)
            .build();
        let retries = RetryConfig::standard()
            .with_max_attempts(MAX_ATTEMPTS)
            .with_initial_backoff(INITIAL_BACKOFF)
            .with_max_backoff(MAX_BACKOFF);
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(region)
            .timeout_config(timeouts)
            .retry_config(retries);
        if let Some(credentials) = credentials {
            loader = loader.credentials_provider(credentials);
        }
        let shared = loader.load().await;
        let region = shared
            .region()
            .map(|r| r.to_string())
            .unwrap_or_else(|| DEFAULT_REGION.to_string());
        let mut config =
            aws_sdk_s3::config::Builder::from(&shared).force_path_style(url.path_style);
        if let Some(endpoint) = &url.endpoint {
            // S3-compatible services (MinIO, COS, moto) do not all accept the checksums the
            // SDK adds by default; send them only where the operation requires one.
            config = config
                .endpoint_url(endpoint)
                .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
                .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        }
        Self {
            client: Client::from_conf(config.build()),
            bucket: url.bucket.clone(),
            prefix: url.prefix.clone(),
            endpoint: url
                .endpoint
                .clone()
                .or_else(|| shared.endpoint_url().map(str::to_string)),
            region,
            path_style: url.path_style,
        }
    }

    /// Fails with [`ObjectError::BucketMissing`] when the bucket is not there, unless
    /// `create` says to create it.
    async fn ensure_bucket(&self, create: bool) -> Result<(), ObjectError> {
        let head = self.client.head_bucket().bucket(&self.bucket).send().await;
        let err = match head {
            Ok(_) => return Ok(()),
            Err(err) => err,
        };
        if !is_not_found(&err) {
            return Err(self.bucket_error("check", &err));
        }
        if !create {
            return Err(ObjectError::BucketMissing(self.bucket.clone()));
        }
        let mut request = self.client.create_bucket().bucket(&self.bucket);
        if self.region != DEFAULT_REGION {
            request = request.create_bucket_configuration(
                CreateBucketConfiguration::builder()
                    .location_constraint(BucketLocationConstraint::from(self.region.as_str()))
                    .build(),
            );
        }
        match request.send().await {
            Ok(_) => Ok(()),
            // Another process created it meanwhile.
            Err(err) if err.code() == Some("BucketAlreadyOwnedByYou") => Ok(()),
            Err(err) => Err(self.bucket_error("creation", &err)),
        }
    }

    fn bucket_error<E>(&self, what: &str, err: &SdkError<E, HttpResponse>) -> ObjectError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        ObjectError::Backend {
            op: "bucket check",
            key: self.bucket.clone(),
            message: format!("bucket {what} at {}: {}", self.describe(), message_of(err)),
        }
    }

    /// The key as stored: the URL's prefix, then the validated key.
    fn full_key(&self, key: &str) -> Result<String, ObjectError> {
        validate_key(key)?;
        Ok(format!("{}{key}", self.prefix))
    }

    /// Maps an SDK error of `op` on `key` (the caller's key, without the URL's prefix).
    fn error<E>(&self, op: &'static str, key: &str, err: &SdkError<E, HttpResponse>) -> ObjectError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        sdk_error(&self.bucket, op, key, err)
    }

    /// A URL for `GET key`, valid for `expires` (at most 7 days), usable without credentials.
    pub async fn presign_get(&self, key: &str, expires: Duration) -> Result<String, ObjectError> {
        let full = self.full_key(key)?;
        let config = presigning(key, "presign get", expires)?;
        let request = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(full)
            .presigned(config)
            .await
            .map_err(|e| self.error("presign get", key, &e))?;
        Ok(request.uri().to_string())
    }

    /// A URL for `PUT key`, valid for `expires` (at most 7 days), usable without credentials.
    /// Send the body with `Content-Type: application/octet-stream`: some S3-compatible
    /// servers store an empty object for a form content type.
    pub async fn presign_put(&self, key: &str, expires: Duration) -> Result<String, ObjectError> {
        let full = self.full_key(key)?;
        let config = presigning(key, "presign put", expires)?;
        let request = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(full)
            .presigned(config)
            .await
            .map_err(|e| self.error("presign put", key, &e))?;
        Ok(request.uri().to_string())
    }

    /// One `ListObjectsV2` page under `prefix` (keys without the URL's prefix) and the
    /// continuation token of the next page, if any.
    async fn list_page(
        &self,
        op: &'static str,
        prefix: &str,
        token: Option<String>,
    ) -> Result<(Vec<ObjectMeta>, Option<String>), ObjectError> {
        let page = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(format!("{}{prefix}", self.prefix))
            .max_keys(DELETE_BATCH)
            .set_continuation_token(token)
            .send()
            .await
            .map_err(|e| self.error(op, prefix, &e))?;
        let objects = page
            .contents()
            .iter()
            .filter_map(|o| {
                let key = o.key()?.strip_prefix(&self.prefix)?;
                Some(ObjectMeta {
                    key: key.to_string(),
                    size: o.size().and_then(|n| u64::try_from(n).ok()).unwrap_or(0),
                })
            })
            .collect();
        let next = match page.next_continuation_token() {
            Some(t) if page.is_truncated() == Some(true) => Some(t.to_string()),
            _ => None,
        };
        Ok((objects, next))
    }

    /// Deletes up to 1000 listed objects in one `DeleteObjects`; returns how many.
    async fn delete_batch(&self, prefix: &str, objects: &[ObjectMeta]) -> Result<u64, ObjectError> {
        if objects.is_empty() {
            return Ok(0);
        }
        let build_error = |e: aws_sdk_s3::error::BuildError| ObjectError::Backend {
            op: "delete",
            key: prefix.to_string(),
            message: e.to_string(),
        };
        let ids = objects
            .iter()
            .map(|o| {
                ObjectIdentifier::builder()
                    .key(format!("{}{}", self.prefix, o.key))
                    .build()
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(build_error)?;
        let delete = Delete::builder()
            .set_objects(Some(ids))
            .quiet(true)
            .build()
            .map_err(build_error)?;
        let answer = self
            .client
            .delete_objects()
            .bucket(&self.bucket)
            .delete(delete)
            .send()
            .await
            .map_err(|e| self.error("delete", prefix, &e))?;
        if let Some(failed) = answer.errors().first() {
            let key = failed.key().unwrap_or(prefix);
            return Err(ObjectError::Backend {
                op: "delete",
                key: key.strip_prefix(&self.prefix).unwrap_or(key).to_string(),
                message: format!(
                    "{} ({} of {} keys of this batch not deleted)",
                    error_text(failed.code(), failed.message()),
                    answer.errors().len(),
                    objects.len()
                ),
            });
        }
        Ok(objects.len() as u64)
    }

    /// Streams a body into `tmp`; returns the bytes written.
    async fn write_body(key: &str, mut body: ByteStream, tmp: &Path) -> Result<u64, ObjectError> {
        let mut file = tokio::fs::File::create(tmp)
            .await
            .map_err(|source| io(key, source))?;
        let mut written = 0u64;
        loop {
            let chunk = body.try_next().await.map_err(|e| ObjectError::Backend {
                op: "get",
                key: key.to_string(),
                message: chain(&e),
            })?;
            let Some(chunk) = chunk else { break };
            file.write_all(&chunk)
                .await
                .map_err(|source| io(key, source))?;
            written += chunk.len() as u64;
        }
        file.flush().await.map_err(|source| io(key, source))?;
        Ok(written)
    }
}

#[async_trait]
impl ObjectStore for S3ObjectStore {
    async fn put_file(&self, key: &str, path: &Path) -> Result<u64, ObjectError> {
        let full = self.full_key(key)?;
        let size = tokio::fs::metadata(path)
            .await
            .map_err(|source| io(key, source))?
            .len();
        if size > MULTIPART_THRESHOLD {
            let upload = MultipartUpload {
                client: &self.client,
                bucket: &self.bucket,
                key,
                full: &full,
            };
            upload.put(path, size).await?;
            return Ok(size);
        }
        let body = ByteStream::read_from()
            .path(path)
            .length(Length::Exact(size))
            .buffer_size(UPLOAD_BUFFER)
            .build()
            .await
            .map_err(|e| file_error(key, &e))?;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(full)
            .content_length(to_i64(size))
            .body(body)
            .send()
            .await
            .map_err(|e| self.error("put", key, &e))?;
        Ok(size)
    }

    async fn put_bytes(&self, key: &str, bytes: &[u8]) -> Result<(), ObjectError> {
        let full = self.full_key(key)?;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(full)
            .body(ByteStream::from(bytes.to_vec()))
            .send()
            .await
            .map_err(|e| self.error("put", key, &e))?;
        Ok(())
    }

    async fn get_to_file(&self, key: &str, path: &Path) -> Result<u64, ObjectError> {
        let full = self.full_key(key)?;
        let object = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(full)
            .send()
            .await
            .map_err(|e| self.error("get", key, &e))?;
        let expected = object.content_length().and_then(|n| u64::try_from(n).ok());
        let tmp = FsObjectStore::temp_of(path);
        let written = match Self::write_body(key, object.body, &tmp).await {
            Ok(n) if expected.is_none_or(|e| e == n) => n,
            Ok(n) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(ObjectError::Backend {
                    op: "get",
                    key: key.to_string(),
                    message: format!(
                        "the body ended after {n} of {} bytes",
                        expected.unwrap_or_default()
                    ),
                });
            }
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(e);
            }
        };
        if let Err(source) = tokio::fs::rename(&tmp, path).await {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(io(key, source));
        }
        Ok(written)
    }

    async fn get_bytes(&self, key: &str) -> Result<Vec<u8>, ObjectError> {
        let full = self.full_key(key)?;
        let object = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(full)
            .send()
            .await
            .map_err(|e| self.error("get", key, &e))?;
        let bytes = object
            .body
            .collect()
            .await
            .map_err(|e| ObjectError::Backend {
                op: "get",
                key: key.to_string(),
                message: chain(&e),
            })?;
        Ok(bytes.into_bytes().to_vec())
    }

    async fn open_read(&self, key: &str) -> Result<(ObjectReader, u64), ObjectError> {
        let full = self.full_key(key)?;
        let object = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(full)
            .send()
            .await
            .map_err(|e| self.error("get", key, &e))?;
        let Some(size) = object.content_length().and_then(|n| u64::try_from(n).ok()) else {
            return Err(ObjectError::Backend {
                op: "get",
                key: key.to_string(),
                message: "the answer carries no content length".into(),
            });
        };
        Ok((Box::pin(object.body.into_async_read()), size))
    }

    async fn exists(&self, key: &str) -> Result<bool, ObjectError> {
        let full = self.full_key(key)?;
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(full)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) => match self.error("exists", key, &e) {
                ObjectError::NotFound(_) => Ok(false),
                other => Err(other),
            },
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, ObjectError> {
        let mut out = Vec::new();
        let mut token = None;
        loop {
            let (page, next) = self.list_page("list", prefix, token).await?;
            out.extend(page);
            match next {
                Some(next) => token = Some(next),
                None => break,
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<u64, ObjectError> {
        // Each listed page (at most 1000 keys) is one DeleteObjects batch. Continuation
        // tokens are positions in key order, so deleting listed keys does not disturb them.
        let mut deleted = 0u64;
        let mut token = None;
        loop {
            let (page, next) = self.list_page("delete", prefix, token).await?;
            deleted += self.delete_batch(prefix, &page).await?;
            match next {
                Some(next) => token = Some(next),
                None => break,
            }
        }
        Ok(deleted)
    }

    async fn presigned_get(
        &self,
        key: &str,
        expires: Duration,
    ) -> Result<Option<String>, ObjectError> {
        self.presign_get(key, expires).await.map(Some)
    }

    async fn presigned_put(
        &self,
        key: &str,
        expires: Duration,
    ) -> Result<Option<String>, ObjectError> {
        self.presign_put(key, expires).await.map(Some)
    }

    fn describe(&self) -> String {
        let prefix = if self.prefix.is_empty() {
            String::new()
        } else {
            format!(" under `{}`", self.prefix)
        };
        let endpoint = self
            .endpoint
            .as_deref()
            .unwrap_or("the AWS default endpoint");
        let style = if self.path_style {
            "path-style"
        } else {
            "virtual-host-style"
        };
        format!(
            "S3 bucket `{}`{prefix} at {endpoint} (region {}, {style})",
            self.bucket, self.region
        )
    }
}

fn presigning(
    key: &str,
    op: &'static str,
    expires: Duration,
) -> Result<PresigningConfig, ObjectError> {
    PresigningConfig::expires_in(expires).map_err(|e| ObjectError::Backend {
        op,
        key: key.to_string(),
        message: chain(&e),
    })
}
