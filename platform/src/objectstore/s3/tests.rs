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
    eprintln!("20 MiB round trip through moto: upload {uploaded:?}, upload + download {total:?}");
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
    let upload = MultipartUpload {
        client: &store.client,
        bucket: &store.bucket,
        key: "staged/t1/code.tar.zst",
        full: "staged/t1/code.tar.zst",
    };
    let err = upload.put(&src, 20 * 1024 * 1024).await.unwrap_err();
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
