//! An OTLP/HTTP trace receiver, the stand-in for an OpenTelemetry collector in the tracing
//! tests: it takes `POST /v1/traces` (protobuf, as the exporters send it), decodes each
//! span, and keeps them and the raw bodies, so a test can check that one task is one
//! connected trace and that no secret was exported.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::{AnyValue as Any, KeyValue};
use prost::Message as _;

use crate::lock;

/// One span as received.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    /// Hex, 32 characters.
    pub trace_id: String,
    /// Hex, 16 characters.
    pub span_id: String,
    /// Hex; empty for a root span.
    pub parent_span_id: String,
    pub name: String,
    /// The sending process's `service.name`.
    pub service: String,
    /// Every attribute as text.
    pub attributes: BTreeMap<String, String>,
}

#[derive(Default)]
struct Received {
    spans: Vec<ReceivedSpan>,
    bodies: Vec<Vec<u8>>,
    refused: usize,
}

/// A running receiver; it stops with the test's runtime.
pub struct OtlpReceiver {
    addr: SocketAddr,
    received: Arc<Mutex<Received>>,
}

impl OtlpReceiver {
    pub async fn start() -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let received = Arc::new(Mutex::new(Received::default()));
        let app = Router::new()
            .route("/v1/traces", post(traces))
            .with_state(received.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, received })
    }

    /// The collector's base URL, as `otlp_endpoint` takes it.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        lock(&self.received).spans.clone()
    }

    /// Whether any body received so far holds `needle` (a secret must not).
    pub fn bodies_contain(&self, needle: &str) -> bool {
        let needle = needle.as_bytes();
        lock(&self.received)
            .bodies
            .iter()
            .any(|b| b.windows(needle.len()).any(|w| w == needle))
    }

    /// Requests it could not decode.
    pub fn refused(&self) -> usize {
        lock(&self.received).refused
    }
}

async fn traces(
    State(received): State<Arc<Mutex<Received>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let protobuf = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-protobuf"));
    let request = match protobuf
        .then(|| ExportTraceServiceRequest::decode(body.as_ref()))
        .transpose()
    {
        Ok(Some(r)) => r,
        Ok(None) | Err(_) => {
            lock(&received).refused += 1;
            return (StatusCode::BAD_REQUEST, "not an OTLP protobuf trace export").into_response();
        }
    };
    let mut spans = Vec::new();
    for resource in request.resource_spans {
        let service = resource
            .resource
            .as_ref()
            .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
            .map(text_of)
            .unwrap_or_default();
        for scope in resource.scope_spans {
            for span in scope.spans {
                spans.push(ReceivedSpan {
                    trace_id: hex::encode(&span.trace_id),
                    span_id: hex::encode(&span.span_id),
                    parent_span_id: hex::encode(&span.parent_span_id),
                    name: span.name,
                    service: service.clone(),
                    attributes: span
                        .attributes
                        .iter()
                        .map(|a| (a.key.clone(), text_of(a)))
                        .collect(),
                });
            }
        }
    }
    {
        let mut r = lock(&received);
        r.spans.extend(spans);
        r.bodies.push(body.to_vec());
    }
    (
        [(header::CONTENT_TYPE, "application/x-protobuf")],
        ExportTraceServiceResponse::default().encode_to_vec(),
    )
        .into_response()
}

fn text_of(kv: &KeyValue) -> String {
    match kv.value.as_ref().and_then(|v: &Any| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}
