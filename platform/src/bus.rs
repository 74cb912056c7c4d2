//! The Kafka adapter (rdkafka over librdkafka): task messages in, result messages out, and
//! a dead-letter topic for task messages that can never run.
//!
//! - [`KafkaSettings`]: brokers, topic names, consumer group and the librdkafka
//!   pass-through settings (SASL/SSL), all from configuration.
//! - [`ensure_topics`]: at start-up, creates the topics (when allowed) or names the missing
//!   one. Brokers are not relied on to auto-create topics: some (Tansu among them) keep the
//!   messages queued forever instead.
//! - [`Producer`]: an idempotent producer (`enable.idempotence=true`, `acks=all`) whose
//!   `send` waits for the delivery report, so "sent" means "stored by the broker".
//! - [`trigger_consumer`]: a `StreamConsumer` in the consumer group, committing only the
//!   offsets the caller stores (at-least-once; the caller dedupes by message key).
//!
//! The DLQ headers are here; the message formats ([`TASK_SCHEMA`], [`ResultMessage`]) are
//! patchflow-api's, re-exported, so the consumer, the results hook and the CLI agree.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use thiserror::Error;

// The message formats are patchflow-api's (typed once for every producer and consumer).
pub use patchflow_api::kafka::{
    MAX_TASK_MESSAGE_BYTES, RESULT_SCHEMA, ResultMessage, ResultObject, TASK_SCHEMA,
};

/// Headers of a dead-lettered message: why, and where it came from.
pub mod dlq_headers {
    pub const ERROR: &str = "patchflow.error";
    pub const ERROR_KIND: &str = "patchflow.error.kind";
    pub const TOPIC: &str = "patchflow.source.topic";
    pub const PARTITION: &str = "patchflow.source.partition";
    pub const OFFSET: &str = "patchflow.source.offset";
}

#[derive(Debug, Error)]
pub enum BusError {
    #[error("Kafka configuration: {0}")]
    Config(String),
    #[error(
        "Kafka topic `{topic}` does not exist on {brokers} (create it, or set kafka_auto_create=true)"
    )]
    MissingTopic { topic: String, brokers: String },
    #[error("Kafka at {brokers} did not answer: {reason}")]
    Unreachable { brokers: String, reason: String },
    #[error("cannot create Kafka topic `{topic}`: {reason}")]
    CreateTopic { topic: String, reason: String },
    #[error("Kafka did not take the message for `{topic}`: {reason}")]
    Delivery { topic: String, reason: String },
    #[error("Kafka: {0}")]
    Kafka(String),
}

/// Where Kafka is and how patchflow uses it.
#[derive(Clone, PartialEq, Eq)]
pub struct KafkaSettings {
    pub brokers: String,
    pub tasks_topic: String,
    pub results_topic: String,
    pub dlq_topic: String,
    pub group: String,
    pub dlq: bool,
    pub auto_create: bool,
    pub partitions: u32,
    /// librdkafka settings passed through as given (SASL/SSL); may hold secrets.
    pub properties: Vec<(String, String)>,
    /// The tenant every task of the tasks topic belongs to (`kafka_tenant`).
    pub tenant: Option<String>,
}

impl std::fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The properties may hold passwords: show their names only.
        let names: Vec<&str> = self.properties.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("KafkaSettings")
            .field("brokers", &self.brokers)
            .field("tasks_topic", &self.tasks_topic)
            .field("results_topic", &self.results_topic)
            .field("dlq_topic", &self.dlq_topic)
            .field("group", &self.group)
            .field("tenant", &self.tenant)
            .field("dlq", &self.dlq)
            .field("auto_create", &self.auto_create)
            .field("properties", &names)
            .finish()
    }
}

/// Settings patchflow owns; the pass-through may not override them, since the delivery
/// guarantees depend on them.
const OWNED_PROPERTIES: [&str; 6] = [
    "bootstrap.servers",
    "group.id",
    "enable.auto.offset.store",
    "enable.idempotence",
    "enable.auto.commit",
    "acks",
];

impl KafkaSettings {
    /// Parses the `key=value,key=value` pass-through. Errors name the pair, never a value.
    pub fn parse_properties(text: &str) -> Result<Vec<(String, String)>, BusError> {
        let mut out = Vec::new();
        for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((k, v)) = pair.split_once('=') else {
                let name: String = pair.chars().take(40).collect();
                return Err(BusError::Config(format!(
                    "kafka_properties: `{name}` is not key=value"
                )));
            };
            let k = k.trim();
            if k.is_empty() {
                return Err(BusError::Config(
                    "kafka_properties: a pair has an empty key".into(),
                ));
            }
            if OWNED_PROPERTIES.contains(&k) {
                return Err(BusError::Config(format!(
                    "kafka_properties: `{k}` is set by patchflow and cannot be overridden"
                )));
            }
            out.push((k.to_string(), v.trim().to_string()));
        }
        Ok(out)
    }

    fn base(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c
    }
}

fn kafka_error(e: &KafkaError) -> String {
    e.to_string()
}

/// Checks that `topics` exist; creates the missing ones when `auto_create` is on, else
/// fails naming the first missing topic.
pub async fn ensure_topics(settings: &KafkaSettings, topics: &[&str]) -> Result<(), BusError> {
    let admin: AdminClient<DefaultClientContext> = settings
        .base()
        .create()
        .map_err(|e| BusError::Config(kafka_error(&e)))?;
    let admin = std::sync::Arc::new(admin);
    let existing = {
        let admin = admin.clone();
        let brokers = settings.brokers.clone();
        // fetch_metadata blocks its thread until the brokers answer.
        tokio::task::spawn_blocking(move || {
            admin
                .inner()
                .fetch_metadata(None, Duration::from_secs(15))
                .map(|m| {
                    m.topics()
                        .iter()
                        .filter(|t| t.error().is_none() && !t.partitions().is_empty())
                        .map(|t| t.name().to_string())
                        .collect::<Vec<_>>()
                })
                .map_err(|e| BusError::Unreachable {
                    brokers,
                    reason: kafka_error(&e),
                })
        })
        .await
        .map_err(|e| BusError::Kafka(e.to_string()))??
    };
    let missing: Vec<&str> = topics
        .iter()
        .copied()
        .filter(|t| !existing.iter().any(|e| e == t))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !settings.auto_create {
        return Err(BusError::MissingTopic {
            topic: missing[0].to_string(),
            brokers: settings.brokers.clone(),
        });
    }
    let partitions = i32::try_from(settings.partitions).unwrap_or(i32::MAX);
    let new: Vec<NewTopic<'_>> = missing
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1)))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(15)));
    let results = admin
        .create_topics(&new, &opts)
        .await
        .map_err(|e| BusError::Unreachable {
            brokers: settings.brokers.clone(),
            reason: kafka_error(&e),
        })?;
    for r in results {
        match r {
            Ok(name) => tracing::info!(topic = %name, partitions, "created Kafka topic"),
            // Another process created it first: that is what we wanted.
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(BusError::CreateTopic {
                    topic,
                    reason: code.to_string(),
                });
            }
        }
    }
    Ok(())
}

/// Where a produced message landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    pub partition: i32,
    pub offset: i64,
}

/// An idempotent producer; each `send` waits for the broker's acknowledgement.
#[derive(Clone)]
pub struct Producer {
    inner: FutureProducer,
    /// How long a message may wait in the producer before it counts as failed.
    timeout: Duration,
}

impl Producer {
    pub fn new(settings: &KafkaSettings, timeout: Duration) -> Result<Self, BusError> {
        let mut c = settings.base();
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", timeout.as_millis().to_string())
            .set("linger.ms", "5");
        let inner: FutureProducer = c.create().map_err(|e| BusError::Config(kafka_error(&e)))?;
        Ok(Self { inner, timeout })
    }

    /// Produces one message and waits until the broker has it (or the timeout passes).
    pub async fn send(
        &self,
        topic: &str,
        key: &[u8],
        payload: &[u8],
        headers: &[(&str, &[u8])],
    ) -> Result<Delivered, BusError> {
        let mut h = OwnedHeaders::new_with_capacity(headers.len());
        for (k, v) in headers {
            h = h.insert(Header {
                key: k,
                value: Some(*v),
            });
        }
        let record = FutureRecord::to(topic).key(key).payload(payload).headers(h);
        match self.inner.send(record, self.timeout).await {
            Ok(d) => Ok(Delivered {
                partition: d.partition,
                offset: d.offset,
            }),
            Err((e, _)) => Err(BusError::Delivery {
                topic: topic.to_string(),
                reason: kafka_error(&e),
            }),
        }
    }
}

/// A consumer in the trigger group, subscribed to the tasks topic. Offsets are committed
/// only after the caller stores them (`store_offset`), in the background and on close, so
/// a message is committed only once it has been handled.
pub fn trigger_consumer(settings: &KafkaSettings) -> Result<StreamConsumer, BusError> {
    let mut c = settings.base();
    c.set("group.id", &settings.group)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("enable.partition.eof", "false")
        // A new task should not wait out a long fetch poll on an idle partition.
        .set("fetch.wait.max.ms", "100");
    let consumer: StreamConsumer = c.create().map_err(|e| BusError::Config(kafka_error(&e)))?;
    consumer
        .subscribe(&[settings.tasks_topic.as_str()])
        .map_err(|e| BusError::Kafka(kafka_error(&e)))?;
    Ok(consumer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_parse_and_refuse_what_patchflow_owns() {
        let p = KafkaSettings::parse_properties(
            " security.protocol=SASL_PLAINTEXT, sasl.mechanism=PLAIN ,sasl.password=a=b,",
        )
        .unwrap();
        assert_eq!(
            p,
            vec![
                (
                    "security.protocol".to_string(),
                    "SASL_PLAINTEXT".to_string()
                ),
                ("sasl.mechanism".to_string(), "PLAIN".to_string()),
                ("sasl.password".to_string(), "a=b".to_string()),
            ]
        );
        let e = KafkaSettings::parse_properties("enable.idempotence=false")
            .unwrap_err()
            .to_string();
        assert!(e.contains("enable.idempotence"), "{e}");
        let e = KafkaSettings::parse_properties("sasl.passwordhunter2")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not key=value"), "{e}");
    }

    #[test]
    fn debug_never_shows_property_values() {
        let s = KafkaSettings {
            brokers: "b:9092".into(),
            tasks_topic: "t".into(),
            results_topic: "r".into(),
            dlq_topic: "d".into(),
            group: "g".into(),
            dlq: true,
            auto_create: true,
            partitions: 3,
            properties: vec![("sasl.password".into(), "hunter2".into())],
            tenant: None,
        };
        let shown = format!("{s:?}");
        assert!(
            shown.contains("sasl.password") && !shown.contains("hunter2"),
            "{shown}"
        );
    }
}
