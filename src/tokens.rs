//! `patchflow tokens create|list|revoke`: token management through the API (an admin
//! token is needed; on the machine of `patchflow up`, `admin.token` is one).

use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use patchflow_core::Config;
use serde_json::{Value, json};

use crate::client::{ServerOpt, http};

#[derive(Debug, Subcommand)]
pub enum TokensCommand {
    /// Make a token; prints it (shown this once).
    Create(CreateArgs),
    /// Every token: id, tenant, role, name, times (never a token's value).
    List(ListArgs),
    /// Revoke a token by its id.
    Revoke(RevokeArgs),
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    #[arg(long)]
    pub tenant: String,
    /// `member` (submit, read, cancel, retry), `viewer` (read) or `admin`.
    #[arg(long, default_value = "member")]
    pub role: String,
    #[arg(long, default_value = "")]
    pub name: String,
    #[arg(long)]
    pub expires_in_days: Option<u32>,
    /// Print the whole answer as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub server: ServerOpt,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub server: ServerOpt,
}

#[derive(Debug, Args)]
pub struct RevokeArgs {
    pub token_id: String,
    #[command(flatten)]
    pub server: ServerOpt,
}

async fn answer(r: reqwest::Response) -> anyhow::Result<Value> {
    let status = r.status();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        anyhow::bail!(
            "{} ({status})",
            body["message"].as_str().unwrap_or("the gateway refused")
        );
    }
    Ok(body)
}

pub async fn run(config: &Config, cmd: TokensCommand) -> anyhow::Result<ExitCode> {
    let client = http(config)?;
    match cmd {
        TokensCommand::Create(a) => {
            let r = client
                .post(format!("{}/api/tokens", a.server.base(config)))
                .json(&json!({
                    "tenant": a.tenant,
                    "role": a.role,
                    "name": a.name,
                    "expires_in_days": a.expires_in_days,
                }))
                .send()
                .await
                .context("cannot reach the gateway")?;
            let v = answer(r).await?;
            if a.json {
                println!("{v}");
            } else {
                println!("{}", v["token"].as_str().unwrap_or_default());
                eprintln!(
                    "token {} for tenant {} ({}); it is shown only now",
                    v["token_id"].as_str().unwrap_or_default(),
                    v["tenant"].as_str().unwrap_or_default(),
                    v["role"].as_str().unwrap_or_default()
                );
            }
        }
        TokensCommand::List(a) => {
            let r = client
                .get(format!("{}/api/tokens", a.server.base(config)))
                .send()
                .await
                .context("cannot reach the gateway")?;
            let v = answer(r).await?;
            if a.json {
                println!("{v}");
            } else {
                for t in v["tokens"].as_array().into_iter().flatten() {
                    let state = if !t["revoked_at"].is_null() {
                        "revoked"
                    } else {
                        "live"
                    };
                    println!(
                        "{}  {:<16} {:<7} {:<8} {}",
                        t["token_id"].as_str().unwrap_or_default(),
                        t["tenant"].as_str().unwrap_or_default(),
                        t["role"].as_str().unwrap_or_default(),
                        state,
                        t["name"].as_str().unwrap_or_default()
                    );
                }
            }
        }
        TokensCommand::Revoke(a) => {
            let r = client
                .delete(format!(
                    "{}/api/tokens/{}",
                    a.server.base(config),
                    a.token_id
                ))
                .send()
                .await
                .context("cannot reach the gateway")?;
            if r.status().as_u16() != 204 {
                answer(r).await?;
            }
            eprintln!("revoked {}", a.token_id);
        }
    }
    Ok(ExitCode::SUCCESS)
}
