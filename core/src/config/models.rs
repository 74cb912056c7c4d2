//! The model table (`[models."NAME"]`, or `PATCHFLOW_MODELS` as JSON): per-model wire,
//! endpoint, key, context window and prices. A model the table does not name uses the
//! `llm` section's settings and costs nothing.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::WireApi;
use super::setting::{Setting, invalid};
use crate::error::CoreError;

/// One model's overrides and prices (USD per million tokens).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelProfile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wire_api: Option<WireApi>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    /// The environment variable holding this model's API key (default `OPENAI_API_KEY`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    /// Tokens the model accepts in one request, prompt and answer together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_window: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_price: Option<f64>,
    /// Price of prompt tokens served from the provider's cache (default: `input_price`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_input_price: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_price: Option<f64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra_headers: BTreeMap<String, String>,
    /// `minimal`, `low`, `medium` or `high`, for reasoning models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_effort: Option<String>,
}

/// What one answer's usage costs under a profile, in dollars. Cached prompt tokens are
/// part of `prompt`; reasoning tokens part of `completion` (priced as output).
pub fn price(profile: &ModelProfile, prompt: u64, cached: u64, completion: u64) -> f64 {
    let per = |tokens: u64, usd_per_million: Option<f64>| {
        tokens as f64 * usd_per_million.unwrap_or(0.0) / 1_000_000.0
    };
    let cached = cached.min(prompt);
    per(prompt - cached, profile.input_price)
        + per(cached, profile.cached_input_price.or(profile.input_price))
        + per(completion, profile.output_price)
}

impl ModelProfile {
    fn validate(&self, name: &str) -> Result<(), String> {
        for (what, p) in [
            ("input_price", self.input_price),
            ("cached_input_price", self.cached_input_price),
            ("output_price", self.output_price),
        ] {
            if let Some(p) = p
                && !(p.is_finite() && p >= 0.0)
            {
                return Err(format!("{name}.{what} must be a price of 0 or more"));
            }
        }
        if let Some(w) = self.context_window
            && w < 1024
        {
            return Err(format!(
                "{name}.context_window must be at least 1024 tokens"
            ));
        }
        if let Some(v) = &self.api_key_env
            && (v.is_empty()
                || !v
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
        {
            return Err(format!(
                "{name}.api_key_env must be an environment variable name (A-Z, 0-9, _)"
            ));
        }
        if let Some(e) = &self.reasoning_effort
            && !["minimal", "low", "medium", "high"].contains(&e.as_str())
        {
            return Err(format!(
                "{name}.reasoning_effort must be minimal, low, medium or high"
            ));
        }
        for (k, v) in &self.extra_headers {
            let name_ok = !k.is_empty()
                && k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            let lower = k.to_ascii_lowercase();
            if !name_ok || v.contains(['\r', '\n']) {
                return Err(format!("{name}.extra_headers: `{k}` is not a header"));
            }
            if [
                "authorization",
                "host",
                "content-length",
                "transfer-encoding",
            ]
            .contains(&lower.as_str())
            {
                return Err(format!(
                    "{name}.extra_headers may not set `{k}` (the key goes in api_key_env)"
                ));
            }
        }
        Ok(())
    }
}

/// Every configured model, by name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ModelTable(pub BTreeMap<String, ModelProfile>);

impl ModelTable {
    pub fn get(&self, model: &str) -> Option<&ModelProfile> {
        self.0.get(model)
    }

    pub fn validate(&self) -> Result<(), String> {
        self.0.iter().try_for_each(|(name, p)| p.validate(name))
    }
}

/// The text form is JSON (`PATCHFLOW_MODELS='{"gpt-5": {"wire_api": "responses"}}'`);
/// the file takes TOML tables.
impl Setting for ModelTable {
    fn parse_text(key: &str, text: &str) -> Result<Self, CoreError> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        let table: Self = serde_json::from_str(text)
            .map_err(|e| invalid(key, format!("not a JSON object of model profiles: {e}")))?;
        table.validate().map_err(|e| invalid(key, e))?;
        Ok(table)
    }
    fn to_text(&self) -> Option<String> {
        (!self.0.is_empty()).then(|| serde_json::to_string(self).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Config;

    #[test]
    fn the_file_takes_tables_and_the_env_json() {
        let text = "model = \"m\"\nwire_api = \"responses\"\n[models.\"gpt-5\"]\nwire_api = \"chat\"\ncontext_window = 8192\ninput_price = 1.25\ncached_input_price = 0.125\noutput_price = 10.0\nextra_headers = { \"X-Team\" = \"a\" }\n";
        let c = Config::from_toml(text).unwrap();
        assert_eq!(c.llm.wire_api, WireApi::Responses);
        let p = c.model_table.models.get("gpt-5").unwrap();
        assert_eq!(p.wire_api, Some(WireApi::Chat));
        assert_eq!(p.context_window, Some(8192));
        assert_eq!(p.extra_headers["X-Team"], "a");
        let mut c2 = Config::default();
        c2.set("models", &c.model_table.models.to_text().unwrap())
            .unwrap();
        assert_eq!(c2.model_table.models, c.model_table.models);
    }

    #[test]
    fn bad_profiles_are_refused_with_the_field_named() {
        for (json, needle) in [
            (r#"{"m": {"input_price": -1}}"#, "m.input_price"),
            (r#"{"m": {"context_window": 10}}"#, "m.context_window"),
            (r#"{"m": {"api_key_env": "sk-live"}}"#, "m.api_key_env"),
            (
                r#"{"m": {"reasoning_effort": "max"}}"#,
                "m.reasoning_effort",
            ),
            (
                r#"{"m": {"extra_headers": {"Authorization": "x"}}}"#,
                "Authorization",
            ),
            (r#"{"m": {"extra_headers": {"X-A": "a\r\nb"}}}"#, "X-A"),
            (r#"{"m": {"prise": 1}}"#, "prise"),
            ("[1]", "model profiles"),
        ] {
            let err = Config::default()
                .set("models", json)
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{json}: {err}");
        }
        let err = Config::from_toml("[models.m]\noutput_price = -2.0\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("m.output_price"), "{err}");
    }

    #[test]
    fn prices_count_cached_tokens_at_their_own_rate() {
        let p = ModelProfile {
            input_price: Some(2.0),
            cached_input_price: Some(0.5),
            output_price: Some(8.0),
            ..ModelProfile::default()
        };
        // 1M prompt of which 400k cached, 100k completion:
        // 600k * 2 + 400k * 0.5 + 100k * 8 = 1.2 + 0.2 + 0.8 dollars.
        let usd = price(&p, 1_000_000, 400_000, 100_000);
        assert!((usd - 2.2).abs() < 1e-12, "{usd}");
        let no_cache_price = ModelProfile {
            cached_input_price: None,
            ..p
        };
        assert!((price(&no_cache_price, 1_000, 1_000, 0) - 0.002).abs() < 1e-12);
        assert_eq!(price(&ModelProfile::default(), 10, 0, 10), 0.0);
    }
}
