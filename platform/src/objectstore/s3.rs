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
    BucketLocationConstraint, CompletedMultipartUpload, CompletedPart, CreateBucketConfiguration,
    Delete, ObjectIdentifier,
};
use aws_smithy_types::byte_stream::{ByteStream, Length};
use tokio::io::AsyncWriteExt;

use super::{FsObjectStore, ObjectError, ObjectMeta, ObjectReader, ObjectStore, validate_key};

/// Files larger than this go up as a multipart upload; smaller ones in one `PutObject`.
pub const MULTIPART_THRESHOLD: u64 = 8 * 1024 * 1024;
/// Size of one multipart part (grown for files that would need more than [`MAX_PARTS`]).
pub const PART_SIZE: u64 = 8 * 1024 * 1024;
/// S3's limit on the parts of one upload.
const MAX_PARTS: u64 = 10_000;
/// S3's limit on the keys of one `DeleteObjects`, and the page size of `ListObjectsV2`.
const DELETE_BATCH: i32 = 1000;
/// Buffer of the file reads that feed an upload.
const UPLOAD_BUFFER: usize = 128 * 1024;

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

/// What an `s3://` URL says.
#[derive(Debug, Clone, PartialEq, Eq)]
struct S3Url {
    bucket: String,
    prefix: String,
    endpoint: Option<String>,
    region: Option<String>,
    path_style: bool,
    create_bucket: bool,
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
    fn error<E>(&self, op: &'static str, key: &str, err: SdkError<E, HttpResponse>) -> ObjectError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        if err.code() == Some("NoSuchBucket") {
            ObjectError::BucketMissing(self.bucket.clone())
        } else if is_not_found(&err) {
            ObjectError::NotFound(key.to_string())
        } else {
            ObjectError::Backend {
                op,
                key: key.to_string(),
                message: message_of(&err),
            }
        }
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
            .map_err(|e| self.error("presign get", key, e))?;
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
            .map_err(|e| self.error("presign put", key, e))?;
        Ok(request.uri().to_string())
    }

    /// A multipart upload of `size` bytes of `path`, one part at a time; aborted on any error.
    async fn put_multipart(
        &self,
        key: &str,
        full: &str,
        path: &Path,
        size: u64,
    ) -> Result<(), ObjectError> {
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(full)
            .send()
            .await
            .map_err(|e| self.error("multipart upload start", key, e))?;
        let Some(upload_id) = created.upload_id().map(str::to_string) else {
            return Err(ObjectError::Backend {
                op: "multipart upload start",
                key: key.to_string(),
                message: "the answer carries no upload id".into(),
            });
        };
        let result = self.upload_parts(key, full, path, size, &upload_id).await;
        if result.is_err() {
            let aborted = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(full)
                .upload_id(&upload_id)
                .send()
                .await;
            if let Err(err) = aborted {
                tracing::warn!(
                    key,
                    error = %message_of(&err),
                    "could not abort a failed multipart upload; a lifecycle rule on incomplete uploads removes it"
                );
            }
        }
        result
    }

    async fn upload_parts(
        &self,
        key: &str,
        full: &str,
        path: &Path,
        size: u64,
        upload_id: &str,
    ) -> Result<(), ObjectError> {
        let part_size = PART_SIZE.max(size.div_ceil(MAX_PARTS));
        let mut parts = Vec::new();
        let mut offset = 0u64;
        let mut number = 1i32;
        while offset < size {
            let len = part_size.min(size - offset);
            // Reads just this range of the file (re-read on a retry), never the whole file.
            let body = ByteStream::read_from()
                .path(path)
                .offset(offset)
                .length(Length::Exact(len))
                .buffer_size(UPLOAD_BUFFER)
                .build()
                .await
                .map_err(|e| file_error(key, e))?;
            let uploaded = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(full)
                .upload_id(upload_id)
                .part_number(number)
                .content_length(to_i64(len))
                .body(body)
                .send()
                .await
                .map_err(|e| self.error("multipart upload part", key, e))?;
            parts.push(
                CompletedPart::builder()
                    .set_e_tag(uploaded.e_tag().map(str::to_string))
                    .part_number(number)
                    .build(),
            );
            offset += len;
            number += 1;
        }
        let count = parts.len();
        let completed = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(full)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await;
        match completed {
            Ok(_) => Ok(()),
            // A 200 whose body is not the documented `CompleteMultipartUploadResult` nor an
            // `Error` (moto 5.2.1 answers `CompleteMultipartUploadResponse`, getmoto/moto#10055;
            // other S3-compatible servers have had such quirks): ask the store what it holds.
            Err(err) if ok_but_unreadable(&err) => {
                self.confirm_multipart(key, full, size, count, &err).await
            }
            Err(err) => Err(self.error("multipart upload completion", key, err)),
        }
    }

    /// Whether the object at `full` is the completed upload: `size` bytes with a multipart
    /// ETag of `count` parts (`"…-count"`).
    async fn confirm_multipart<E>(
        &self,
        key: &str,
        full: &str,
        size: u64,
        count: usize,
        answer: &SdkError<E, HttpResponse>,
    ) -> Result<(), ObjectError>
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let head = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(full)
            .send()
            .await
            .map_err(|e| self.error("multipart upload completion", key, e))?;
        let size_ok = head.content_length().and_then(|n| u64::try_from(n).ok()) == Some(size);
        let etag_ok = head
            .e_tag()
            .is_some_and(|t| t.trim_matches('"').ends_with(&format!("-{count}")));
        if size_ok && etag_ok {
            Ok(())
        } else {
            Err(ObjectError::Backend {
                op: "multipart upload completion",
                key: key.to_string(),
                message: format!(
                    "the store answered 200 with an unreadable body ({}) and does not hold \
                     the {size} bytes in {count} parts",
                    chain(answer)
                ),
            })
        }
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
            .map_err(|e| self.error(op, prefix, e))?;
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
            .map_err(|e| self.error("delete", prefix, e))?;
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
            self.put_multipart(key, &full, path, size).await?;
            return Ok(size);
        }
        let body = ByteStream::read_from()
            .path(path)
            .length(Length::Exact(size))
            .buffer_size(UPLOAD_BUFFER)
            .build()
            .await
            .map_err(|e| file_error(key, e))?;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(full)
            .content_length(to_i64(size))
            .body(body)
            .send()
            .await
            .map_err(|e| self.error("put", key, e))?;
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
            .map_err(|e| self.error("put", key, e))?;
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
            .map_err(|e| self.error("get", key, e))?;
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
            .map_err(|e| self.error("get", key, e))?;
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
            .map_err(|e| self.error("get", key, e))?;
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
            Err(e) => match self.error("exists", key, e) {
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

/// Parses `s3://BUCKET[/PREFIX]?endpoint=URL&region=REGION&path_style=…&create_bucket=…`.
/// Errors show the bucket and prefix but never a query value that could be a secret.
fn parse_url(url: &str) -> Result<S3Url, ObjectError> {
    let Some(rest) = url.strip_prefix("s3://") else {
        return Err(ObjectError::UnsupportedUrl(url.to_string()));
    };
    let (location, query) = rest.split_once('?').unwrap_or((rest, ""));
    let shown = format!("s3://{location}");
    let invalid = |reason: String| ObjectError::InvalidUrl {
        url: if location.contains('@') {
            "s3://***".to_string()
        } else {
            shown.clone()
        },
        reason,
    };
    if location.contains('@') {
        return Err(invalid(
            "credentials do not belong in the URL; use the AWS credential chain \
             (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile, or an instance role)"
                .into(),
        ));
    }
    let (bucket, prefix) = location.split_once('/').unwrap_or((location, ""));
    let bucket_ok = (3..=255).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !bucket_ok {
        return Err(invalid(format!(
            "`{bucket}` is not a bucket name (3-63 characters: letters, digits, `.`, `-`)"
        )));
    }
    let prefix = prefix.trim_end_matches('/');
    if !prefix.is_empty() && validate_key(prefix).is_err() {
        return Err(invalid(format!(
            "key prefix `{prefix}` is not a relative path of letters, digits, `.`, `_`, `-`"
        )));
    }
    let mut parsed = S3Url {
        bucket: bucket.to_string(),
        prefix: if prefix.is_empty() {
            String::new()
        } else {
            format!("{prefix}/")
        },
        endpoint: None,
        region: None,
        path_style: false,
        create_bucket: false,
    };
    let mut path_style = None;
    let mut seen = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, raw) = pair.split_once('=').unwrap_or((pair, ""));
        let known = ["endpoint", "region", "path_style", "create_bucket"];
        let Some(name) = known.iter().copied().find(|k| *k == name) else {
            return Err(invalid(format!(
                "unknown parameter `{}` (known: {}; credentials come from the AWS chain)",
                name.chars().take(40).collect::<String>(),
                known.join(", ")
            )));
        };
        if seen.contains(&name) {
            return Err(invalid(format!("parameter `{name}` given twice")));
        }
        seen.push(name);
        let Some(value) = percent_decode(raw) else {
            return Err(invalid(format!(
                "parameter `{name}` is not percent-encoded properly"
            )));
        };
        match name {
            "endpoint" => {
                let scheme_ok = value.starts_with("http://") || value.starts_with("https://");
                if value.contains('@') {
                    return Err(invalid(
                        "the endpoint must not carry credentials; use the AWS credential chain"
                            .into(),
                    ));
                }
                if !scheme_ok {
                    return Err(invalid(format!(
                        "endpoint `{value}` is not an http:// or https:// URL"
                    )));
                }
                parsed.endpoint = Some(value.trim_end_matches('/').to_string());
            }
            "region" if value.is_empty() => {
                return Err(invalid("parameter `region` is empty".into()));
            }
            "region" => parsed.region = Some(value),
            "path_style" => path_style = Some(parse_bool(name, &value).map_err(invalid)?),
            _ => parsed.create_bucket = parse_bool(name, &value).map_err(invalid)?,
        }
    }
    // MinIO, moto and most self-hosted servers want path-style; AWS and COS virtual-host.
    parsed.path_style = path_style.unwrap_or(parsed.endpoint.is_some());
    Ok(parsed)
}

fn parse_bool(name: &str, value: &str) -> Result<bool, String> {
    match value {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        other => Err(format!(
            "parameter `{name}` is `{other}`, not true or false"
        )),
    }
}

/// Decodes `%XX` escapes (and `+` as a space, as in a query); `None` for a broken escape or
/// a result that is not UTF-8.
fn percent_decode(raw: &str) -> Option<String> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
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

/// A 200 answer the SDK could not read as the operation's result, and not an `Error`
/// document either (S3 can answer 200 with an `Error` body; the SDK gives those a code).
fn ok_but_unreadable<E>(err: &SdkError<E, HttpResponse>) -> bool
where
    E: ProvideErrorMetadata,
{
    matches!(err, SdkError::ServiceError(s) if s.raw().status().as_u16() == 200)
        && err.code().is_none()
}

/// Whether the store answered "no such key/bucket" (a 404, with or without an error body).
fn is_not_found<E>(err: &SdkError<E, HttpResponse>) -> bool
where
    E: ProvideErrorMetadata,
{
    matches!(err.code(), Some("NoSuchKey" | "NotFound" | "NoSuchBucket"))
        || err.raw_response().map(|r| r.status().as_u16()) == Some(404)
}

/// What went wrong, for an error message: the service's code and message, or the chain of
/// causes of a transport failure (which name no credentials, unlike a Debug dump of the
/// request).
fn message_of<E>(err: &SdkError<E, HttpResponse>) -> String
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

fn error_text(code: Option<&str>, message: Option<&str>) -> String {
    match (code, message) {
        (Some(code), Some(message)) if !message.is_empty() => format!("{code}: {message}"),
        (Some(code), _) => code.to_string(),
        (None, Some(message)) if !message.is_empty() => message.to_string(),
        _ => "the service gave no reason".to_string(),
    }
}

/// An error and its sources, `a: b: c`.
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
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

fn io(key: &str, source: std::io::Error) -> ObjectError {
    ObjectError::Io {
        key: key.to_string(),
        source,
    }
}

/// A local file that could not be opened for an upload.
fn file_error(key: &str, err: aws_smithy_types::byte_stream::error::Error) -> ObjectError {
    io(key, std::io::Error::other(chain(&err)))
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    //! Against a real S3-compatible server: `moto_server` (PyPI `moto[server]`), one
    //! in-memory server per test, started and killed by [`Moto`].

    use std::process::{Child, Command, Stdio};
    use std::time::Instant;

    use sha2::{Digest, Sha256};
    use tokio::io::AsyncReadExt;

    use super::*;

    const KEY_ID: &str = "test";
    const SECRET: &str = "test-secret-never-shown";

    /// A `moto_server` child process on a free port, killed (with its process group) on drop.
    struct Moto {
        child: Child,
        endpoint: String,
        _log: tempfile::NamedTempFile,
    }

    impl Moto {
        async fn start() -> Self {
            let port = free_port();
            let log = tempfile::NamedTempFile::new().unwrap();
            let mut command = Command::new("moto_server");
            command
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(log.reopen().unwrap())
                .stderr(log.reopen().unwrap());
            std::os::unix::process::CommandExt::process_group(&mut command, 0);
            let child = match command.spawn() {
                Ok(child) => child,
                Err(e) => panic!(
                    "cannot start `moto_server` ({e}); these tests need an S3-compatible \
                     server: install it with `python3 -m pip install \"moto[server]\"`"
                ),
            };
            let mut moto = Self {
                child,
                endpoint: format!("http://127.0.0.1:{port}"),
                _log: log,
            };
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if reqwest::get(&moto.endpoint).await.is_ok() {
                    return moto;
                }
                if let Ok(Some(status)) = moto.child.try_wait() {
                    let log = std::fs::read_to_string(moto._log.path()).unwrap_or_default();
                    panic!(
                        "`moto_server` exited ({status}) before answering; is it installed \
                         (`python3 -m pip install \"moto[server]\"`)? Its output:\n{log}"
                    );
                }
                assert!(
                    Instant::now() < deadline,
                    "`moto_server` did not answer on {} within 30 s",
                    moto.endpoint
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }

        fn url(&self, bucket_and_prefix: &str, extra: &str) -> String {
            format!(
                "s3://{bucket_and_prefix}?endpoint={}&region=us-east-1{extra}",
                self.endpoint
            )
        }

        /// A store on a new bucket of this server.
        async fn store(&self, bucket_and_prefix: &str) -> S3ObjectStore {
            S3ObjectStore::with_credentials(
                &self.url(bucket_and_prefix, "&create_bucket=true"),
                KEY_ID,
                SECRET,
            )
            .await
            .unwrap()
        }
    }

    impl Drop for Moto {
        fn drop(&mut self) {
            if let Ok(pid) = i32::try_from(self.child.id()) {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn free_port() -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    }

    /// `len` bytes that do not compress and do not repeat per part.
    fn pseudo_random(len: usize) -> Vec<u8> {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.extend_from_slice(&x.to_le_bytes());
        }
        out.truncate(len);
        out
    }

    fn sha256_file(path: &Path) -> String {
        let mut hasher = Sha256::new();
        let mut file = std::fs::File::open(path).unwrap();
        std::io::copy(&mut file, &mut hasher).unwrap();
        format!("{:x}", hasher.finalize())
    }

    #[tokio::test]
    async fn round_trips_small_objects() {
        let moto = Moto::start().await;
        let store = moto.store("round-trip").await;
        store
            .put_bytes("results/t1/diff.patch", b"d")
            .await
            .unwrap();
        store
            .put_bytes("results/t1/summary.json", b"{}")
            .await
            .unwrap();
        store
            .put_bytes("results/t2/diff.patch", b"xyz")
            .await
            .unwrap();

        assert_eq!(
            store.get_bytes("results/t1/diff.patch").await.unwrap(),
            b"d"
        );
        assert!(store.exists("results/t1/summary.json").await.unwrap());
        assert!(!store.exists("results/t1/nothing").await.unwrap());
        assert_eq!(
            store.list("results/").await.unwrap(),
            [
                ObjectMeta {
                    key: "results/t1/diff.patch".into(),
                    size: 1
                },
                ObjectMeta {
                    key: "results/t1/summary.json".into(),
                    size: 2
                },
                ObjectMeta {
                    key: "results/t2/diff.patch".into(),
                    size: 3
                },
            ]
        );
        assert!(store.list("uploads/").await.unwrap().is_empty());

        assert_eq!(store.delete_prefix("results/t1/").await.unwrap(), 2);
        assert!(!store.exists("results/t1/diff.patch").await.unwrap());
        assert!(store.exists("results/t2/diff.patch").await.unwrap());
        assert_eq!(store.delete_prefix("results/t1/").await.unwrap(), 0);

        // A missing key is NotFound, named, from every reading operation; nothing is left
        // behind by a failed download.
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out");
        for result in [
            store.get_bytes("results/t1/diff.patch").await.map(|_| ()),
            store.open_read("results/t1/diff.patch").await.map(|_| ()),
            store
                .get_to_file("results/t1/diff.patch", &dest)
                .await
                .map(|_| ()),
        ] {
            match result {
                Err(ObjectError::NotFound(key)) => assert_eq!(key, "results/t1/diff.patch"),
                other => panic!("expected NotFound, got {other:?}"),
            }
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

        // Invalid keys are refused before any request.
        for bad in ["../escape", "/abs", "a//b", "a b"] {
            assert!(
                matches!(
                    store.put_bytes(bad, b"x").await,
                    Err(ObjectError::InvalidKey(_))
                ),
                "{bad}"
            );
            assert!(matches!(
                store.get_bytes(bad).await,
                Err(ObjectError::InvalidKey(_))
            ));
        }

        let described = store.describe();
        assert!(described.contains("round-trip"), "{described}");
        assert!(described.contains(&moto.endpoint), "{described}");
        assert!(!described.contains(SECRET), "{described}");

        // Through the trait object too.
        let dyn_store: &dyn ObjectStore = &store;
        assert_eq!(
            dyn_store.get_bytes("results/t2/diff.patch").await.unwrap(),
            b"xyz"
        );
    }

    #[tokio::test]
    async fn delete_prefix_deletes_in_batches_of_1000() {
        let moto = Moto::start().await;
        let store = moto.store("many-objects").await;
        let keys: Vec<String> = (0..1005).map(|i| format!("staged/t/{i:05}")).collect();
        let puts = keys.iter().map(|k| store.put_bytes(k, b"x"));
        use futures::StreamExt;
        let results: Vec<_> = futures::stream::iter(puts)
            .buffer_unordered(16)
            .collect()
            .await;
        assert!(results.iter().all(Result::is_ok));
        store.put_bytes("staged/u/keep", b"k").await.unwrap();
        let listed = store.list("staged/t/").await.unwrap();
        assert_eq!(listed.len(), 1005);
        assert!(listed.windows(2).all(|w| w[0].key < w[1].key));
        assert_eq!(store.delete_prefix("staged/t/").await.unwrap(), 1005);
        assert!(store.list("staged/t/").await.unwrap().is_empty());
        assert!(store.exists("staged/u/keep").await.unwrap());
    }

    #[tokio::test]
    async fn multipart_round_trip_of_20_mib() {
        let moto = Moto::start().await;
        let store = moto.store("multipart").await;
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("code.tar.zst");
        let size = 20 * 1024 * 1024;
        std::fs::write(&src, pseudo_random(size)).unwrap();
        let want = sha256_file(&src);

        let started = Instant::now();
        assert_eq!(
            store
                .put_file("staged/t1/code.tar.zst", &src)
                .await
                .unwrap(),
            size as u64
        );
        let uploaded = started.elapsed();
        let dest = dir.path().join("back.tar.zst");
        assert_eq!(
            store
                .get_to_file("staged/t1/code.tar.zst", &dest)
                .await
                .unwrap(),
            size as u64
        );
        let total = started.elapsed();
        eprintln!(
            "20 MiB round trip through moto: upload {uploaded:?}, upload + download {total:?}"
        );
        assert_eq!(sha256_file(&dest), want);
        // Only the destination is left: the temporary download file was renamed.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);

        // It went up in three parts (8 + 8 + 4 MiB): a multipart ETag ends in `-3`.
        let head = store
            .client
            .head_object()
            .bucket(&store.bucket)
            .key("staged/t1/code.tar.zst")
            .send()
            .await
            .unwrap();
        let etag = head.e_tag().unwrap_or_default();
        assert!(etag.trim_matches('"').ends_with("-3"), "{etag}");
        assert_eq!(
            store.list("staged/t1/").await.unwrap(),
            [ObjectMeta {
                key: "staged/t1/code.tar.zst".into(),
                size: size as u64
            }]
        );

        // A small file goes up in one PutObject (no part suffix).
        let small = dir.path().join("small");
        std::fs::write(&small, b"small file").unwrap();
        assert_eq!(store.put_file("staged/t1/small", &small).await.unwrap(), 10);
        assert_eq!(
            store.get_bytes("staged/t1/small").await.unwrap(),
            b"small file"
        );

        // A missing local file is an I/O error naming the key; nothing is uploaded.
        match store
            .put_file("staged/t1/none", &dir.path().join("none"))
            .await
        {
            Err(ObjectError::Io { key, .. }) => assert_eq!(key, "staged/t1/none"),
            other => panic!("expected Io, got {other:?}"),
        }
        assert!(!store.exists("staged/t1/none").await.unwrap());
        // No multipart upload is left open.
        let open = store
            .client
            .list_multipart_uploads()
            .bucket(&store.bucket)
            .send()
            .await
            .unwrap();
        assert!(open.uploads().is_empty(), "{:?}", open.uploads());
    }

    #[tokio::test]
    async fn failed_multipart_upload_is_aborted() {
        let moto = Moto::start().await;
        let store = moto.store("aborted").await;
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("short");
        std::fs::write(&src, pseudo_random(10 * 1024 * 1024)).unwrap();
        // The file is shorter than the size the upload was started for (as if it shrank
        // meanwhile): the second part cannot be read, and the upload is aborted.
        let err = store
            .put_multipart(
                "staged/t1/code.tar.zst",
                "staged/t1/code.tar.zst",
                &src,
                20 * 1024 * 1024,
            )
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ObjectError::Io { key, .. } if key == "staged/t1/code.tar.zst"),
            "{err:?}"
        );
        let open = store
            .client
            .list_multipart_uploads()
            .bucket(&store.bucket)
            .send()
            .await
            .unwrap();
        assert!(open.uploads().is_empty(), "{:?}", open.uploads());
        assert!(!store.exists("staged/t1/code.tar.zst").await.unwrap());
    }

    #[tokio::test]
    async fn open_read_streams_the_object() {
        let moto = Moto::start().await;
        let store = moto.store("streaming").await;
        let bytes = pseudo_random(3 * 1024 * 1024 + 17);
        store
            .put_bytes("results/t1/agent.log", &bytes)
            .await
            .unwrap();
        let (mut reader, size) = store.open_read("results/t1/agent.log").await.unwrap();
        assert_eq!(size, bytes.len() as u64);
        let mut first = vec![0u8; 1000];
        reader.read_exact(&mut first).await.unwrap();
        assert_eq!(first, bytes[..1000]);
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, bytes[1000..]);
    }

    #[tokio::test]
    async fn presigned_urls_work_without_credentials() {
        let moto = Moto::start().await;
        let store = moto.store("presigned/runs").await;
        let http = reqwest::Client::new();

        let put_url = store
            .presigned_put("results/t1/diff.patch", Duration::from_secs(600))
            .await
            .unwrap()
            .unwrap();
        assert!(!put_url.contains(SECRET), "{put_url}");
        assert!(
            put_url.contains("presigned/runs/results/t1/diff.patch"),
            "{put_url}"
        );
        let answer = http
            .put(&put_url)
            .header("content-type", "application/octet-stream")
            .body(b"presigned body".to_vec())
            .send()
            .await
            .unwrap();
        assert!(answer.status().is_success(), "{}", answer.status());
        assert_eq!(
            store.get_bytes("results/t1/diff.patch").await.unwrap(),
            b"presigned body"
        );

        let get_url = store
            .presign_get("results/t1/diff.patch", Duration::from_secs(600))
            .await
            .unwrap();
        let answer = http.get(&get_url).send().await.unwrap();
        assert!(answer.status().is_success(), "{}", answer.status());
        assert_eq!(answer.bytes().await.unwrap().as_ref(), b"presigned body");

        // The trait method gives the same kind of URL; keys are checked first.
        let via_trait = store
            .presigned_get("results/t1/diff.patch", Duration::from_secs(60))
            .await
            .unwrap()
            .unwrap();
        assert!(via_trait.starts_with(&moto.endpoint), "{via_trait}");
        assert!(matches!(
            store.presign_get("../x", Duration::from_secs(60)).await,
            Err(ObjectError::InvalidKey(_))
        ));
        // More than S3's 7 days is refused, naming the key.
        match store
            .presign_get("results/t1/diff.patch", Duration::from_secs(8 * 24 * 3600))
            .await
        {
            Err(ObjectError::Backend { op, key, .. }) => {
                assert_eq!((op, key.as_str()), ("presign get", "results/t1/diff.patch"))
            }
            other => panic!("expected a presign error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn key_prefix_from_the_url_is_applied() {
        let moto = Moto::start().await;
        let tenant = moto.store("prefixed/tenant-a/").await;
        let whole = moto.store("prefixed").await;
        tenant
            .put_bytes("results/t1/diff.patch", b"a")
            .await
            .unwrap();
        whole
            .put_bytes("results/t1/diff.patch", b"b")
            .await
            .unwrap();

        assert_eq!(
            whole
                .get_bytes("tenant-a/results/t1/diff.patch")
                .await
                .unwrap(),
            b"a"
        );
        assert_eq!(
            tenant.list("").await.unwrap(),
            [ObjectMeta {
                key: "results/t1/diff.patch".into(),
                size: 1
            }]
        );
        let keys: Vec<_> = whole
            .list("")
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        assert_eq!(
            keys,
            ["results/t1/diff.patch", "tenant-a/results/t1/diff.patch"]
        );
        assert_eq!(tenant.delete_prefix("").await.unwrap(), 1);
        assert!(whole.exists("results/t1/diff.patch").await.unwrap());
        assert!(
            !whole
                .exists("tenant-a/results/t1/diff.patch")
                .await
                .unwrap()
        );
        assert!(
            tenant.describe().contains("tenant-a/"),
            "{}",
            tenant.describe()
        );
    }

    #[tokio::test]
    async fn unreachable_endpoint_fails_fast_naming_key_and_operation() {
        let port = free_port(); // bound, then released: nothing listens there
        let url = format!("s3://nowhere-bucket?endpoint=http://127.0.0.1:{port}&region=us-east-1");
        let parsed = parse_url(&url).unwrap();
        let credentials = aws_sdk_s3::config::Credentials::new(KEY_ID, SECRET, None, None, "test");

        let started = Instant::now();
        let store = S3ObjectStore::connect(&parsed, Some(credentials)).await;
        let err = store
            .put_bytes("results/t1/diff.patch", b"x")
            .await
            .unwrap_err();
        let elapsed = started.elapsed();
        let text = err.to_string();
        assert!(
            matches!(&err, ObjectError::Backend { op: "put", key, .. } if key == "results/t1/diff.patch"),
            "{err:?}"
        );
        assert!(
            text.contains("put") && text.contains("results/t1/diff.patch"),
            "{text}"
        );
        assert!(!text.contains(SECRET), "{text}");
        assert!(
            elapsed < Duration::from_secs(15),
            "took {elapsed:?}: {text}"
        );
        eprintln!("unreachable endpoint failed in {elapsed:?}: {text}");

        // Opening checks the bucket, so the failure shows at start-up, naming the bucket.
        let started = Instant::now();
        let err = match S3ObjectStore::with_credentials(&url, KEY_ID, SECRET).await {
            Err(err) => err,
            Ok(_) => panic!("opened a store on a closed port"),
        };
        let text = err.to_string();
        assert!(text.contains("nowhere-bucket"), "{text}");
        assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
        assert!(started.elapsed() < Duration::from_secs(15), "{text}");
    }

    #[tokio::test]
    async fn missing_bucket_is_a_clear_error_at_open() {
        let moto = Moto::start().await;
        let url = moto.url("absent-bucket", "");
        let err = match S3ObjectStore::with_credentials(&url, KEY_ID, SECRET).await {
            Err(err) => err,
            Ok(_) => panic!("opened a store on a missing bucket"),
        };
        assert!(
            matches!(&err, ObjectError::BucketMissing(b) if b == "absent-bucket"),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(
            text.contains("`absent-bucket`") && text.contains("create_bucket=true"),
            "{text}"
        );

        // With create_bucket it is created once and reopened as is.
        let url = moto.url("absent-bucket", "&create_bucket=true");
        let first = S3ObjectStore::with_credentials(&url, KEY_ID, SECRET)
            .await
            .unwrap();
        first.put_bytes("a/b", b"1").await.unwrap();
        let again = S3ObjectStore::with_credentials(&url, KEY_ID, SECRET)
            .await
            .unwrap();
        assert_eq!(again.get_bytes("a/b").await.unwrap(), b"1");
    }

    #[test]
    fn parses_urls() {
        let aws = parse_url("s3://my-bucket").unwrap();
        assert_eq!(
            aws,
            S3Url {
                bucket: "my-bucket".into(),
                prefix: String::new(),
                endpoint: None,
                region: None,
                path_style: false,
                create_bucket: false,
            }
        );
        let minio = parse_url(
            "s3://patchflow/prod/objects/?endpoint=http%3A%2F%2Fminio%3A9000&region=eu-west-1&create_bucket=true",
        )
        .unwrap();
        assert_eq!(minio.prefix, "prod/objects/");
        assert_eq!(minio.endpoint.as_deref(), Some("http://minio:9000"));
        assert_eq!(minio.region.as_deref(), Some("eu-west-1"));
        assert!(minio.path_style && minio.create_bucket);
        let cos = parse_url(
            "s3://code-1250000000?endpoint=https://cos.ap-guangzhou.myqcloud.com&region=ap-guangzhou&path_style=false",
        )
        .unwrap();
        assert!(!cos.path_style);

        for (bad, says) in [
            ("s3://", "bucket name"),
            ("s3://ab", "bucket name"),
            ("s3://bucket/../x?", "key prefix"),
            ("s3://bucket?path_style=yes", "path_style"),
            ("s3://bucket?endpoint=minio:9000", "http://"),
            ("s3://bucket?region=", "region"),
            ("s3://bucket?region=a&region=b", "twice"),
            ("s3://bucket?endpoint=%zz", "percent"),
        ] {
            let err = parse_url(bad).unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
        // Secrets in a URL are refused without being echoed.
        for secret in [
            "s3://AKIA:hunter2@bucket",
            "s3://bucket?secret_key=hunter2",
            "s3://bucket?endpoint=http://AKIA:hunter2@minio:9000",
        ] {
            let err = parse_url(secret).unwrap_err().to_string();
            assert!(!err.contains("hunter2"), "{err}");
            assert!(err.contains("credential"), "{err}");
        }
        assert!(matches!(
            parse_url("gs://bucket"),
            Err(ObjectError::UnsupportedUrl(_))
        ));
    }

    #[tokio::test]
    async fn open_dispatches_s3_urls() {
        // `objectstore::open` hands `s3://` to this module (refused here before any request).
        match super::super::open("s3://bucket?nope=1").await {
            Err(ObjectError::InvalidUrl { reason, .. }) => assert!(reason.contains("nope")),
            Err(other) => panic!("expected InvalidUrl, got {other:?}"),
            Ok(_) => panic!("opened a store from a bad URL"),
        }
        match super::super::open("gs://bucket").await {
            Err(err @ ObjectError::UnsupportedUrl(_)) => {
                let text = err.to_string();
                assert!(
                    text.contains("file:///PATH") && text.contains("s3://BUCKET"),
                    "{text}"
                );
            }
            Err(other) => panic!("expected UnsupportedUrl, got {other:?}"),
            Ok(_) => panic!("opened a store from gs://"),
        }
    }

    /// Presigning needs no network: a URL for AWS itself carries no checksum of an empty
    /// body (which would make every upload through it fail) and no secret.
    #[tokio::test]
    async fn presigned_put_for_aws_carries_no_checksum() {
        let parsed = parse_url("s3://patchflow-results/p?region=eu-central-1").unwrap();
        let credentials =
            aws_sdk_s3::config::Credentials::new("AKIDEXAMPLE", SECRET, None, None, "test");
        let store = S3ObjectStore::connect(&parsed, Some(credentials)).await;
        let url = store
            .presign_put("results/t1/diff.patch", Duration::from_secs(60))
            .await
            .unwrap();
        assert!(
            url.starts_with(
                "https://patchflow-results.s3.eu-central-1.amazonaws.com/p/results/t1/diff.patch?"
            ),
            "{url}"
        );
        assert!(!url.to_ascii_lowercase().contains("checksum"), "{url}");
        assert!(!url.contains(SECRET), "{url}");
        assert_eq!(
            store.describe(),
            "S3 bucket `patchflow-results` under `p/` at the AWS default endpoint \
             (region eu-central-1, virtual-host-style)"
        );
    }
}
