//! `call-api`: one HTTP request through `wasi:http/outgoing-handler`. The guest has no
//! sockets; the host checks every request against the task's egress policy, adds secret
//! headers itself, and refuses anything else before a packet leaves.

use wasip2::http::outgoing_handler;
use wasip2::http::types::{Fields, IncomingBody, Method, OutgoingBody, OutgoingRequest, Scheme};
use wasip2::io::streams::StreamError;

use crate::exports::patchflow::tools::tools::{ApiRequest, ApiResponse};

/// What one write to an output stream may carry (the WASI limit is 4096 bytes).
const WRITE_CHUNK: usize = 4096;

struct Target<'a> {
    scheme: Scheme,
    authority: &'a str,
    path_and_query: &'a str,
}

fn split_url(url: &str) -> Result<Target<'_>, String> {
    let (scheme, rest) = if let Some(r) = url.strip_prefix("https://") {
        (Scheme::Https, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (Scheme::Http, r)
    } else {
        return Err(format!("`{url}` is not an http:// or https:// URL"));
    };
    let cut = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(cut);
    if authority.is_empty() {
        return Err(format!("`{url}` has no host"));
    }
    Ok(Target {
        scheme,
        authority,
        path_and_query: if path.is_empty() { "/" } else { path },
    })
}

fn method(name: &str) -> Result<Method, String> {
    Ok(match name.to_ascii_uppercase().as_str() {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "POST" => Method::Post,
        "PUT" => Method::Put,
        "PATCH" => Method::Patch,
        "DELETE" => Method::Delete,
        other => return Err(format!("method `{other}` is not allowed")),
    })
}

pub fn call(req: ApiRequest) -> Result<ApiResponse, String> {
    let target = split_url(&req.url)?;
    let body_bytes = req.body.as_deref().unwrap_or("").as_bytes();
    // A known length instead of chunked transfer: what most APIs expect of a small body.
    let mut fields: Vec<(String, Vec<u8>)> = req
        .headers
        .iter()
        .filter(|(k, _)| !k.eq_ignore_ascii_case("content-length"))
        .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
        .collect();
    if req.body.is_some() {
        fields.push((
            "content-length".into(),
            body_bytes.len().to_string().into_bytes(),
        ));
    }
    let headers =
        Fields::from_list(&fields).map_err(|e| format!("invalid request headers: {e:?}"))?;
    let outgoing = OutgoingRequest::new(headers);
    let bad = |what: &str| format!("invalid request {what}");
    outgoing
        .set_method(&method(&req.method)?)
        .map_err(|_| bad("method"))?;
    outgoing
        .set_scheme(Some(&target.scheme))
        .map_err(|_| bad("scheme"))?;
    outgoing
        .set_authority(Some(target.authority))
        .map_err(|_| bad("host"))?;
    outgoing
        .set_path_with_query(Some(target.path_and_query))
        .map_err(|_| bad("path"))?;
    let body = outgoing.body().map_err(|_| bad("body"))?;
    let pending =
        outgoing_handler::handle(outgoing, None).map_err(|e| format!("request refused: {e:?}"))?;
    {
        let stream = body.write().map_err(|_| bad("body"))?;
        for chunk in body_bytes.chunks(WRITE_CHUNK) {
            stream
                .blocking_write_and_flush(chunk)
                .map_err(|e| format!("cannot send the request body: {e:?}"))?;
        }
    }
    OutgoingBody::finish(body, None).map_err(|e| format!("cannot send the request: {e:?}"))?;
    pending.subscribe().block();
    let response = match pending.get() {
        Some(Ok(Ok(r))) => r,
        Some(Ok(Err(e))) => return Err(format!("request failed: {e:?}")),
        Some(Err(())) | None => return Err("request failed: no response".into()),
    };
    let status = response.status();
    let headers: Vec<(String, String)> = response
        .headers()
        .entries()
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
        .collect();
    let incoming = response
        .consume()
        .map_err(|_| "cannot read the response body".to_string())?;
    let (bytes, truncated) = read_body(&incoming, req.max_response_bytes as usize)?;
    drop(incoming);
    Ok(ApiResponse {
        status,
        headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
        truncated,
    })
}

/// Reads at most `cap` bytes of the body; the rest is left unread (and dropped).
fn read_body(body: &IncomingBody, cap: usize) -> Result<(Vec<u8>, bool), String> {
    let stream = body
        .stream()
        .map_err(|_| "cannot read the response body".to_string())?;
    let mut out = Vec::new();
    loop {
        match stream.blocking_read(64 * 1024) {
            Ok(chunk) => {
                if out.len() + chunk.len() > cap {
                    let room = cap - out.len();
                    out.extend_from_slice(&chunk[..room]);
                    return Ok((out, true));
                }
                out.extend_from_slice(&chunk);
            }
            Err(StreamError::Closed) => return Ok((out, false)),
            Err(StreamError::LastOperationFailed(e)) => {
                return Err(format!(
                    "reading the response failed: {}",
                    e.to_debug_string()
                ));
            }
        }
    }
}
