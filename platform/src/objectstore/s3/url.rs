//! The `s3://` URL: bucket, key prefix and the query parameters that choose the endpoint,
//! region, addressing style and bucket creation. Parsing makes no request and never echoes
//! a query value that could be a secret.

use crate::objectstore::{ObjectError, validate_key};

/// What an `s3://` URL says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct S3Url {
    pub(super) bucket: String,
    pub(super) prefix: String,
    pub(super) endpoint: Option<String>,
    pub(super) region: Option<String>,
    pub(super) path_style: bool,
    pub(super) create_bucket: bool,
}

/// Parses `s3://BUCKET[/PREFIX]?endpoint=URL&region=REGION&path_style=…&create_bucket=…`.
/// Errors show the bucket and prefix but never a query value that could be a secret.
pub(super) fn parse_url(url: &str) -> Result<S3Url, ObjectError> {
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
