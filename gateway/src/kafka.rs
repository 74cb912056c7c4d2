//! The Kafka trigger: task messages from the tasks topic become [`TaskService::submit`]
//! calls, exactly as if they had been posted to `POST /api/tasks`.
//!
//! Delivery: at-least-once from Kafka, exactly-once starts. The message key is the task's
//! idempotency key, so the task id (= workflow id) is the same however often a message is
//! delivered (a crash before commit, a rebalance, two consumers racing): a repeat finds the
//! task already there and starts nothing. A message's offset is stored for commit only once
//! its start is acknowledged by Temporal (or found already started) or it is dead-lettered.
//!
//! Order and isolation: each assigned partition has its own lane (a task handling its
//! messages one at a time, in offset order), so a slow or failing start delays only the
//! messages behind it on the same partition. When a lane's queue is full the partition is
//! paused and its messages wait in hand; the others keep flowing.
//!
//! Failures: a message that can never run (not JSON, an unknown `schema`, missing or wrong
//! fields, over [`patchflow_api::kafka::MAX_TASK_MESSAGE_BYTES`], a spec the service
//! refuses; [`parse_task_message`] names which) goes to the DLQ topic
//! with its original bytes and key, and headers naming the error and its source
//! topic/partition/offset; then its offset is committed. A transient failure (Temporal, the
//! task store or the DLQ itself unreachable, a rate limit) is retried with backoff, and the
//! offset is not committed until it succeeds.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
// The message's format and its parsing are patchflow-api's; re-exported for the bench.
pub use patchflow_api::kafka::{Malformed, parse_task_message};
use patchflow_platform::bus::{self, BusError, KafkaSettings, Producer, dlq_headers};
use rdkafka::TopicPartitionList;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Message, OwnedMessage};
use tokio::sync::{mpsc, watch};

use crate::error::ServiceError;
use crate::service::TaskService;

/// Messages a lane holds queued before its partition is paused. Large on purpose: on Tansu
/// a paused partition was not fetched again after `resume` (seen in `bench kafka` with a
/// queue of 16), so pausing is kept for a real backlog (a long Temporal outage) only.
const LANE_QUEUE: usize = 1024;

/// What happened to one message, for logs, tests and `bench kafka`.
#[derive(Debug, Clone)]
pub enum TriggerEvent {
    /// The workflow is started (or was already): `created` is false for a repeat.
    Started {
        task_id: String,
        created: bool,
        partition: i32,
        offset: i64,
        /// The message's producer timestamp (ms since the epoch), if any.
        produced_ms: Option<i64>,
    },
    DeadLettered {
        kind: Malformed,
        partition: i32,
        offset: i64,
    },
}

/// Whether a submit error can never succeed for this message.
fn is_permanent(e: &ServiceError) -> bool {
    matches!(
        e,
        ServiceError::Invalid(_) | ServiceError::BadRequest(_) | ServiceError::TooLarge { .. }
    )
}

/// The trigger consumer and what it needs.
pub struct Trigger {
    service: TaskService,
    settings: KafkaSettings,
    dlq: Option<Producer>,
    events: Option<mpsc::UnboundedSender<TriggerEvent>>,
}

struct Lane {
    tx: mpsc::Sender<OwnedMessage>,
    /// Messages in hand that the lane's queue had no room for (the partition is paused).
    held: VecDeque<OwnedMessage>,
    paused: bool,
    /// Highest offset in hand (queued, held or done); a redelivered lower one is skipped.
    last_seen: i64,
    task: tokio::task::JoinHandle<()>,
}

impl Trigger {
    /// Checks the topics (creating them when allowed) and prepares the DLQ producer.
    pub async fn new(service: TaskService, settings: KafkaSettings) -> Result<Self, BusError> {
        let mut topics = vec![settings.tasks_topic.as_str()];
        if settings.dlq {
            topics.push(settings.dlq_topic.as_str());
        }
        bus::ensure_topics(&settings, &topics).await?;
        let dlq = if settings.dlq {
            Some(Producer::new(&settings, Duration::from_secs(30))?)
        } else {
            None
        };
        Ok(Self {
            service,
            settings,
            dlq,
            events: None,
        })
    }

    /// Reports what happens to each message on `tx` (tests, benchmarks).
    pub fn with_events(mut self, tx: mpsc::UnboundedSender<TriggerEvent>) -> Self {
        self.events = Some(tx);
        self
    }

    /// Consumes until `stop` turns true, then lets each lane finish the message in hand
    /// and commits what was handled.
    pub async fn run(self, mut stop: watch::Receiver<bool>) -> Result<(), BusError> {
        let consumer = Arc::new(bus::trigger_consumer(&self.settings)?);
        tracing::info!(
            brokers = %self.settings.brokers,
            topic = %self.settings.tasks_topic,
            group = %self.settings.group,
            "Kafka trigger consuming"
        );
        let shared = Arc::new(LaneShared {
            service: self.service.clone(),
            settings: self.settings.clone(),
            dlq: self.dlq.clone(),
            events: self.events.clone(),
            consumer: consumer.clone(),
            stop: stop.clone(),
        });
        let mut lanes: HashMap<(String, i32), Lane> = HashMap::new();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut last_error = Instant::now() - Duration::from_secs(60);
        loop {
            tokio::select! {
                _ = stopped(&mut stop) => break,
                m = consumer.recv() => match m {
                    Ok(m) => {
                        let msg = m.detach();
                        dispatch(&shared, &mut lanes, msg);
                    }
                    Err(e) => {
                        if last_error.elapsed() > Duration::from_secs(10) {
                            tracing::warn!(error = %e, "Kafka consumer error (retrying)");
                            last_error = Instant::now();
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                },
                _ = tick.tick() => flush(&consumer, &mut lanes),
            }
        }
        tracing::info!("Kafka trigger stopping");
        let mut tasks = Vec::new();
        for (_, lane) in lanes.drain() {
            drop(lane.tx);
            tasks.push(lane.task);
        }
        let _ =
            tokio::time::timeout(Duration::from_secs(20), futures::future::join_all(tasks)).await;
        // What the lanes stored is committed now rather than at the next interval.
        if let Err(e) = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync) {
            tracing::debug!(error = %e, "final commit");
        }
        Ok(())
    }
}

/// What every lane shares.
struct LaneShared {
    service: TaskService,
    settings: KafkaSettings,
    dlq: Option<Producer>,
    events: Option<mpsc::UnboundedSender<TriggerEvent>>,
    consumer: Arc<StreamConsumer>,
    stop: watch::Receiver<bool>,
}

fn partition_list(topic: &str, partition: i32) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    tpl
}

fn dispatch(shared: &Arc<LaneShared>, lanes: &mut HashMap<(String, i32), Lane>, msg: OwnedMessage) {
    let id = (msg.topic().to_string(), msg.partition());
    let lane = lanes.entry(id.clone()).or_insert_with(|| {
        let (tx, rx) = mpsc::channel(LANE_QUEUE);
        let task = tokio::spawn(run_lane(shared.clone(), rx));
        Lane {
            tx,
            held: VecDeque::new(),
            paused: false,
            last_seen: -1,
            task,
        }
    });
    if msg.offset() <= lane.last_seen {
        // Fetched again after a pause or rebalance while an earlier copy is still in hand.
        return;
    }
    lane.last_seen = msg.offset();
    if lane.held.is_empty() {
        match lane.tx.try_send(msg) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(m)) | Err(mpsc::error::TrySendError::Closed(m)) => {
                lane.held.push_back(m)
            }
        }
    } else {
        lane.held.push_back(msg);
    }
    if !lane.paused {
        match shared.consumer.pause(&partition_list(&id.0, id.1)) {
            Ok(()) => lane.paused = true,
            Err(e) => tracing::debug!(partition = id.1, error = %e, "cannot pause"),
        }
    }
}

/// Moves held messages into lanes that have room again, resuming their partitions.
fn flush(consumer: &StreamConsumer, lanes: &mut HashMap<(String, i32), Lane>) {
    for ((topic, partition), lane) in lanes.iter_mut() {
        while let Some(m) = lane.held.pop_front() {
            match lane.tx.try_send(m) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(m))
                | Err(mpsc::error::TrySendError::Closed(m)) => {
                    lane.held.push_front(m);
                    break;
                }
            }
        }
        if lane.held.is_empty() && lane.paused {
            match consumer.resume(&partition_list(topic, *partition)) {
                Ok(()) => lane.paused = false,
                Err(e) => tracing::debug!(partition, error = %e, "cannot resume"),
            }
        }
    }
}

/// One partition's messages, one at a time, in order.
async fn run_lane(shared: Arc<LaneShared>, mut rx: mpsc::Receiver<OwnedMessage>) {
    while let Some(msg) = rx.recv().await {
        if *shared.stop.borrow() {
            return;
        }
        if !handle(&shared, &msg).await {
            // Stopped before this message was handled: it stays uncommitted.
            return;
        }
        if let Err(e) = shared
            .consumer
            .store_offset(msg.topic(), msg.partition(), msg.offset())
        {
            // The partition was revoked meanwhile; its new owner sees the message again
            // and finds the task already started.
            tracing::debug!(partition = msg.partition(), offset = msg.offset(), error = %e, "offset not stored");
        }
    }
}

/// Resolves once `stop` turns true (the guard `wait_for` returns is not `Send`, so it is
/// dropped here rather than held by a caller's `select!`).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Backoff for transient failures: forever, up to 10 s apart, until the consumer stops.
fn backoff() -> impl Iterator<Item = Duration> {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times()
        .build()
}

/// Sleeps `d` unless the consumer stops first; false when stopping.
async fn pause_unless_stopped(shared: &LaneShared, d: Duration) -> bool {
    let mut stop = shared.stop.clone();
    tokio::select! {
        _ = stopped(&mut stop) => false,
        _ = tokio::time::sleep(d) => true,
    }
}

/// The task a message of the tasks topic asks for; with `kafka_tenant`, that tenant's,
/// whatever the message says.
fn task_of(
    settings: &KafkaSettings,
    payload: Option<&[u8]>,
    key: Option<&[u8]>,
    origin: (&str, i32, i64),
) -> Result<patchflow_core::TaskSpec, (Malformed, String)> {
    let mut spec = parse_task_message(payload, key, origin)?;
    if let Some(t) = settings.tenant.as_deref().filter(|t| !t.is_empty()) {
        spec.tenant = t.to_string();
    }
    Ok(spec)
}

/// The producer's W3C trace context, from the message's `traceparent` header.
fn traceparent_of(msg: &OwnedMessage) -> Option<String> {
    use rdkafka::message::Headers as _;
    let headers = msg.headers()?;
    headers
        .iter()
        .find(|h| h.key == patchflow_core::trace::TRACEPARENT_HEADER)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(str::to_string)
}

/// Handles one message to the end (started, or dead-lettered); false if the consumer
/// stopped first.
async fn handle(shared: &LaneShared, msg: &OwnedMessage) -> bool {
    let origin = (msg.topic(), msg.partition(), msg.offset());
    let spec = match task_of(&shared.settings, msg.payload(), msg.key(), origin) {
        Ok(s) => s,
        Err((kind, error)) => return dead_letter(shared, msg, kind, &error).await,
    };
    let traceparent = traceparent_of(msg);
    let mut delays = backoff();
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        match shared
            .service
            .submit(spec.clone(), None, traceparent.as_deref())
            .await
        {
            Ok(out) => {
                let out = out.counted("kafka");
                patchflow_platform::metrics::global().kafka(if out.created {
                    "started"
                } else {
                    "duplicate"
                });
                tracing::info!(
                    task_id = %out.record.task_id,
                    created = out.created,
                    partition = origin.1,
                    offset = origin.2,
                    "Kafka message started its task"
                );
                if let Some(tx) = &shared.events {
                    let _ = tx.send(TriggerEvent::Started {
                        task_id: out.record.task_id.to_string(),
                        created: out.created,
                        partition: origin.1,
                        offset: origin.2,
                        produced_ms: msg.timestamp().to_millis(),
                    });
                }
                return true;
            }
            Err(e) if is_permanent(&e) => {
                return dead_letter(shared, msg, Malformed::Invalid, &e.to_string()).await;
            }
            Err(e) => {
                patchflow_platform::metrics::global().kafka("retried");
                let wait = match &e {
                    ServiceError::RateLimited {
                        retry_after_secs, ..
                    } => Duration::from_secs(*retry_after_secs),
                    _ => delays.next().unwrap_or(Duration::from_secs(10)),
                };
                tracing::warn!(
                    partition = origin.1,
                    offset = origin.2,
                    attempt,
                    error = %e,
                    "cannot start the task of a Kafka message yet; retrying (offset not committed)"
                );
                if !pause_unless_stopped(shared, wait).await {
                    return false;
                }
            }
        }
    }
}

async fn dead_letter(
    shared: &LaneShared,
    msg: &OwnedMessage,
    kind: Malformed,
    error: &str,
) -> bool {
    patchflow_platform::metrics::global().kafka("dead_letter");
    let (topic, partition, offset) = (msg.topic(), msg.partition(), msg.offset());
    tracing::warn!(partition, offset, kind = kind.as_str(), %error, "malformed Kafka message");
    let Some(producer) = &shared.dlq else {
        return true;
    };
    let (p, o) = (partition.to_string(), offset.to_string());
    let headers: [(&str, &[u8]); 5] = [
        (dlq_headers::ERROR, error.as_bytes()),
        (dlq_headers::ERROR_KIND, kind.as_str().as_bytes()),
        (dlq_headers::TOPIC, topic.as_bytes()),
        (dlq_headers::PARTITION, p.as_bytes()),
        (dlq_headers::OFFSET, o.as_bytes()),
    ];
    let mut delays = backoff();
    loop {
        match producer
            .send(
                &shared.settings.dlq_topic,
                msg.key().unwrap_or_default(),
                msg.payload().unwrap_or_default(),
                &headers,
            )
            .await
        {
            Ok(_) => {
                if let Some(tx) = &shared.events {
                    let _ = tx.send(TriggerEvent::DeadLettered {
                        kind,
                        partition,
                        offset,
                    });
                }
                return true;
            }
            Err(e) => {
                tracing::warn!(partition, offset, error = %e, "cannot write to the DLQ yet; retrying");
                let wait = delays.next().unwrap_or(Duration::from_secs(10));
                if !pause_unless_stopped(shared, wait).await {
                    return false;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_s_trace_context_is_its_traceparent_header_as_text() {
        use rdkafka::message::{Header, OwnedHeaders, Timestamp};
        let message = |headers: Option<OwnedHeaders>| {
            OwnedMessage::new(
                None,
                None,
                "t".into(),
                Timestamp::NotAvailable,
                0,
                0,
                headers,
            )
        };
        let with = |key: &str, value: &[u8]| {
            message(Some(OwnedHeaders::new().insert(Header {
                key,
                value: Some(value),
            })))
        };
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            traceparent_of(&with("traceparent", good.as_bytes())).as_deref(),
            Some(good)
        );
        // Not text, another header, or none: no trace context (and the task still starts).
        assert_eq!(traceparent_of(&with("traceparent", &[0xff, 0xfe])), None);
        assert_eq!(
            traceparent_of(&with("x-traceparent", good.as_bytes())),
            None
        );
        assert_eq!(traceparent_of(&message(None)), None);
    }

    #[test]
    fn kafka_tenant_overrides_the_tenant_a_message_names() {
        let mut settings = KafkaSettings {
            brokers: "127.0.0.1:9092".into(),
            tasks_topic: "t".into(),
            results_topic: "r".into(),
            dlq_topic: "d".into(),
            group: "g".into(),
            dlq: true,
            auto_create: false,
            partitions: 1,
            properties: Vec::new(),
            tenant: None,
        };
        let msg = br#"{"schema": "patchflow.task.v1", "git_url": "https://example.com/r.git", "task_description": "x", "tenant": "someone-else"}"#;
        let origin = ("t", 0, 1);
        assert_eq!(
            task_of(&settings, Some(msg), None, origin).unwrap().tenant,
            "someone-else"
        );
        settings.tenant = Some("team-k".into());
        assert_eq!(
            task_of(&settings, Some(msg), None, origin).unwrap().tenant,
            "team-k"
        );
        // Malformed messages are refused as before.
        assert!(task_of(&settings, Some(b"{"), None, origin).is_err());
    }
}
