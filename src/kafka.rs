//! Wiring of Kafka into the processes: the trigger consumer beside a gateway (or a worker
//! with `--kafka`), and the results producer inside the worker's activities. Both are off
//! unless `kafka_brokers` is set.

use std::time::Duration;

use anyhow::Context;
use patchflow_activities::results::ResultsTopic;
use patchflow_core::Config;
use patchflow_gateway::TaskService;
use patchflow_gateway::kafka::Trigger;
use patchflow_platform::bus::{self, KafkaSettings, Producer};

/// The Kafka settings, if Kafka is configured.
pub fn settings(config: &Config) -> anyhow::Result<Option<KafkaSettings>> {
    let Some(brokers) = config.kafka.kafka_brokers.clone() else {
        return Ok(None);
    };
    let properties = match &config.kafka.kafka_properties {
        Some(p) => KafkaSettings::parse_properties(p.expose())?,
        None => Vec::new(),
    };
    Ok(Some(KafkaSettings {
        brokers,
        tasks_topic: config.kafka.kafka_tasks_topic.clone(),
        results_topic: config.kafka.kafka_results_topic.clone(),
        dlq_topic: config.kafka.kafka_dlq_topic.clone(),
        group: config.kafka.kafka_group.clone(),
        dlq: config.kafka.kafka_dlq,
        auto_create: config.kafka.kafka_auto_create,
        partitions: config.kafka.kafka_partitions,
        properties,
        tenant: config.kafka.kafka_tenant.clone(),
    }))
}

/// The results producer for the worker's activities (the topic checked or created first).
pub async fn results_topic(config: &Config) -> anyhow::Result<Option<ResultsTopic>> {
    let Some(s) = settings(config)? else {
        return Ok(None);
    };
    bus::ensure_topics(&s, &[s.results_topic.as_str()])
        .await
        .context("the Kafka results topic is not usable")?;
    let producer = Producer::new(&s, Duration::from_secs(20))?;
    tracing::info!(brokers = %s.brokers, topic = %s.results_topic, "result messages go to Kafka");
    Ok(Some(ResultsTopic {
        producer,
        topic: s.results_topic,
        presign_expiry: Duration::from_secs(config.store.presign_expiry_secs),
    }))
}

pub type TriggerHandle = tokio::task::JoinHandle<anyhow::Result<()>>;

/// Starts the trigger consumer when Kafka is configured; it runs until `stop` turns true.
pub async fn start_trigger(
    config: &Config,
    service: TaskService,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Option<TriggerHandle>> {
    let Some(s) = settings(config)? else {
        return Ok(None);
    };
    let trigger = Trigger::new(service, s)
        .await
        .context("cannot start the Kafka trigger")?;
    Ok(Some(tokio::spawn(async move {
        trigger.run(stop).await.context("the Kafka trigger stopped")
    })))
}

/// Waits for the trigger to finish (after the stop signal).
pub async fn join_trigger(handle: Option<TriggerHandle>) -> anyhow::Result<()> {
    match handle {
        Some(h) => h.await.context("the Kafka trigger panicked")?,
        None => Ok(()),
    }
}
