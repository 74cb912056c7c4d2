//! Multipart uploads of large files: one part at a time, each read from its range of the file
//! (so no file is held in memory), the upload aborted on any error so the bucket keeps no
//! half-written object.

use std::path::Path;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_smithy_types::byte_stream::{ByteStream, Length};

use super::errors::{chain, file_error, message_of, ok_but_unreadable, sdk_error};
use crate::objectstore::ObjectError;

/// Files larger than this go up as a multipart upload; smaller ones in one `PutObject`.
pub const MULTIPART_THRESHOLD: u64 = 8 * 1024 * 1024;
/// Size of one multipart part (grown for files that would need more than [`MAX_PARTS`]).
pub const PART_SIZE: u64 = 8 * 1024 * 1024;
/// S3's limit on the parts of one upload.
const MAX_PARTS: u64 = 10_000;
/// Buffer of the file reads that feed an upload.
pub(super) const UPLOAD_BUFFER: usize = 128 * 1024;

/// Where one multipart upload goes.
pub(super) struct MultipartUpload<'a> {
    pub(super) client: &'a Client,
    pub(super) bucket: &'a str,
    /// The caller's key, as errors name it (without the URL's prefix).
    pub(super) key: &'a str,
    /// The key as stored.
    pub(super) full: &'a str,
}

impl MultipartUpload<'_> {
    /// Uploads `size` bytes of `path`, one part at a time; aborted on any error.
    pub(super) async fn put(&self, path: &Path, size: u64) -> Result<(), ObjectError> {
        let created = self
            .client
            .create_multipart_upload()
            .bucket(self.bucket)
            .key(self.full)
            .send()
            .await
            .map_err(|e| self.error("multipart upload start", &e))?;
        let Some(upload_id) = created.upload_id().map(str::to_string) else {
            return Err(ObjectError::Backend {
                op: "multipart upload start",
                key: self.key.to_string(),
                message: "the answer carries no upload id".into(),
            });
        };
        let result = self.upload_parts(path, size, &upload_id).await;
        if result.is_err() {
            let aborted = self
                .client
                .abort_multipart_upload()
                .bucket(self.bucket)
                .key(self.full)
                .upload_id(&upload_id)
                .send()
                .await;
            if let Err(err) = aborted {
                tracing::warn!(
                    key = self.key,
                    error = %message_of(&err),
                    "could not abort a failed multipart upload; a lifecycle rule on incomplete uploads removes it"
                );
            }
        }
        result
    }

    async fn upload_parts(
        &self,
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
                .map_err(|e| file_error(self.key, &e))?;
            let uploaded = self
                .client
                .upload_part()
                .bucket(self.bucket)
                .key(self.full)
                .upload_id(upload_id)
                .part_number(number)
                .content_length(to_i64(len))
                .body(body)
                .send()
                .await
                .map_err(|e| self.error("multipart upload part", &e))?;
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
            .bucket(self.bucket)
            .key(self.full)
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
            Err(err) if ok_but_unreadable(&err) => self.confirm(size, count, &err).await,
            Err(err) => Err(self.error("multipart upload completion", &err)),
        }
    }

    /// Whether the stored object is the completed upload: `size` bytes with a multipart
    /// ETag of `count` parts (`"…-count"`).
    async fn confirm<E>(
        &self,
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
            .bucket(self.bucket)
            .key(self.full)
            .send()
            .await
            .map_err(|e| self.error("multipart upload completion", &e))?;
        let size_ok = head.content_length().and_then(|n| u64::try_from(n).ok()) == Some(size);
        let etag_ok = head
            .e_tag()
            .is_some_and(|t| t.trim_matches('"').ends_with(&format!("-{count}")));
        if size_ok && etag_ok {
            Ok(())
        } else {
            Err(ObjectError::Backend {
                op: "multipart upload completion",
                key: self.key.to_string(),
                message: format!(
                    "the store answered 200 with an unreadable body ({}) and does not hold \
                     the {size} bytes in {count} parts",
                    chain(answer)
                ),
            })
        }
    }

    fn error<E>(&self, op: &'static str, err: &SdkError<E, HttpResponse>) -> ObjectError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        sdk_error(self.bucket, op, self.key, err)
    }
}

/// A byte count as S3's `Content-Length` type.
pub(super) fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
