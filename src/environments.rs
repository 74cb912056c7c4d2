//! `patchflow env create|update|list|show|delete|reset-cache`: a tenant's saved
//! environments through the HTTP API (`/api/environments`), with the caller's token.
//! Secrets are read from the CLI's own environment (`--secret-env NAME`), so their values
//! never sit on a command line, in `ps` or in shell history.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use patchflow_api::{EnvironmentBody, EnvironmentList, EnvironmentView, ErrorBody};
use patchflow_core::Config;
use patchflow_core::Secret;
use patchflow_core::environment::SetupNetwork;

use crate::client::{ServerOpt, http};

#[derive(Debug, Subcommand)]
pub enum EnvCommand {
    /// Save a new environment (its name must be free in the tenant).
    Create(DefineArgs),
    /// Replace an environment's definition; its secrets are kept unless `--secret-env` or
    /// `--clear-secrets` is given.
    Update(DefineArgs),
    /// The tenant's environments, by name.
    List(ListArgs),
    /// One environment as JSON (secret names only, never values).
    Show(NameArgs),
    /// Delete an environment and its cached states.
    Delete(NameArgs),
    /// Start an environment's cache over (a new generation; cached states removed).
    ResetCache(NameArgs),
}

#[derive(Debug, Args)]
pub struct DefineArgs {
    pub name: String,
    /// The setup script: a file, or `-` for standard input.
    #[arg(long, value_name = "FILE|-")]
    pub setup_script: String,
    /// The script run on a cache hit: a file, or `-` for standard input.
    #[arg(long, value_name = "FILE|-")]
    pub maintenance_script: Option<String>,
    /// A variable of both scripts (not secret: shown as it is), `KEY=VALUE`; repeatable.
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// A secret for the setup script, read from this variable of the CLI's environment
    /// (`NAME`, or `NAME=VAR` to read `$VAR`); repeatable.
    #[arg(long = "secret-env", value_name = "NAME[=VAR]")]
    pub secret_env: Vec<String>,
    /// With `update`: remove every stored secret (with `--secret-env`: keep only those).
    #[arg(long)]
    pub clear_secrets: bool,
    /// Whether the scripts may use the network (default on).
    #[arg(long, value_parser = ["on", "off"])]
    pub network: Option<String>,
    /// With network on, a host the scripts may reach (all public hosts if none); repeatable.
    #[arg(long = "allow-host", value_name = "HOST")]
    pub allow_host: Vec<String>,
    /// Never cache the prepared state.
    #[arg(long)]
    pub no_cache: bool,
    /// A path kept in the cache besides the workspace (`~/…` or workspace-relative).
    #[arg(long = "cache-path", value_name = "PATH")]
    pub cache_path: Vec<String>,
    /// A file whose contents join the cache key (instead of the lockfiles found).
    #[arg(long = "cache-key-file", value_name = "PATH")]
    pub cache_key_file: Vec<String>,
    /// The repository it is meant for (informational).
    #[arg(long)]
    pub repo: Option<String>,
    #[command(flatten)]
    pub scope: Scope,
}

#[derive(Debug, Args)]
pub struct Scope {
    /// Another tenant's environments (admin tokens only).
    #[arg(long)]
    pub tenant: Option<String>,
    /// Print the answer as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub server: ServerOpt,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub scope: Scope,
}

#[derive(Debug, Args)]
pub struct NameArgs {
    pub name: String,
    #[command(flatten)]
    pub scope: Scope,
}

/// A script from a file, or standard input for `-`.
fn read_script(arg: &str, what: &str) -> anyhow::Result<String> {
    if arg == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .with_context(|| format!("cannot read the {what} from standard input"))?;
        return Ok(s);
    }
    std::fs::read_to_string(Path::new(arg)).with_context(|| format!("cannot read {what} {arg}"))
}

/// The body `create` and `update` send.
fn body_of(a: &DefineArgs) -> anyhow::Result<EnvironmentBody> {
    if a.setup_script == "-" && a.maintenance_script.as_deref() == Some("-") {
        bail!("only one of --setup-script and --maintenance-script can read standard input");
    }
    let mut env = BTreeMap::new();
    for kv in &a.env {
        let Some((k, v)) = kv.split_once('=') else {
            bail!("--env `{kv}`: give KEY=VALUE");
        };
        env.insert(k.to_string(), v.to_string());
    }
    let mut secrets = BTreeMap::new();
    for spec in &a.secret_env {
        let (name, var) = spec.split_once('=').unwrap_or((spec, spec));
        let value = std::env::var(var).map_err(|_| {
            anyhow::anyhow!(
                "--secret-env {name}: the variable `{var}` is not set in this environment"
            )
        })?;
        secrets.insert(name.to_string(), Secret::new(value));
    }
    let network = match a.network.as_deref() {
        Some("off") => Some(SetupNetwork::Off),
        Some(_) => Some(SetupNetwork::On),
        None => None,
    };
    Ok(EnvironmentBody {
        name: a.name.clone(),
        repo: a.repo.clone(),
        setup_script: read_script(&a.setup_script, "setup script")?,
        maintenance_script: a
            .maintenance_script
            .as_deref()
            .map(|m| read_script(m, "maintenance script"))
            .transpose()?,
        env,
        secrets: (!secrets.is_empty() || a.clear_secrets).then_some(secrets),
        network,
        allow_hosts: a.allow_host.clone(),
        cache: a.no_cache.then_some(false),
        cache_paths: a.cache_path.clone(),
        cache_key_files: a.cache_key_file.clone(),
    })
}

/// The answer's body, or the gateway's reason as the error.
async fn answer(r: reqwest::Response) -> anyhow::Result<String> {
    let status = r.status();
    let text = r.text().await.unwrap_or_default();
    if !status.is_success() {
        let message = serde_json::from_str::<ErrorBody>(&text)
            .map(|e| e.message)
            .unwrap_or(text);
        bail!("{} ({status})", message.trim());
    }
    Ok(text)
}

/// `/api/environments[/NAME[/rest]]` of the gateway, with `?tenant=` when given.
fn url(
    scope: &Scope,
    config: &Config,
    name: Option<&str>,
    rest: &str,
) -> anyhow::Result<reqwest::Url> {
    let mut u = reqwest::Url::parse(&format!("{}/api/environments", scope.server.base(config)))
        .context("the gateway's address is not a URL")?;
    if let Some(n) = name {
        u.path_segments_mut()
            .map_err(|()| anyhow::anyhow!("the gateway's address cannot have a path"))?
            .push(n);
    }
    if !rest.is_empty() {
        u.path_segments_mut()
            .map_err(|()| anyhow::anyhow!("the gateway's address cannot have a path"))?
            .push(rest);
    }
    if let Some(t) = &scope.tenant {
        u.query_pairs_mut().append_pair("tenant", t);
    }
    Ok(u)
}

fn print_view(text: &str, json: bool, verb: &str) -> anyhow::Result<()> {
    let v: EnvironmentView =
        serde_json::from_str(text).context("the gateway's answer is not an environment")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{}", v.name);
        eprintln!(
            "{verb} environment {} (secrets: {}; secrets_version {}, cache_generation {})",
            v.name,
            if v.secret_names.is_empty() {
                "none".to_string()
            } else {
                v.secret_names.join(", ")
            },
            v.secrets_version,
            v.cache_generation
        );
    }
    Ok(())
}

pub async fn run(config: &Config, cmd: EnvCommand) -> anyhow::Result<ExitCode> {
    let client = http(config)?;
    let reach = "cannot reach the gateway";
    match cmd {
        EnvCommand::Create(a) => {
            let body = body_of(&a)?;
            let r = client
                .post(url(&a.scope, config, None, "")?)
                .json(&body)
                .send()
                .await
                .context(reach)?;
            print_view(&answer(r).await?, a.scope.json, "created")?;
        }
        EnvCommand::Update(a) => {
            let body = body_of(&a)?;
            let r = client
                .put(url(&a.scope, config, Some(&a.name), "")?)
                .json(&body)
                .send()
                .await
                .context(reach)?;
            print_view(&answer(r).await?, a.scope.json, "updated")?;
        }
        EnvCommand::List(a) => {
            let r = client
                .get(url(&a.scope, config, None, "")?)
                .send()
                .await
                .context(reach)?;
            let text = answer(r).await?;
            let list: EnvironmentList =
                serde_json::from_str(&text).context("the gateway's answer is not a list")?;
            if a.scope.json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!(
                    "{:<24} {:<7} {:>4} {:>4}  {:<20} REPO",
                    "NAME", "NETWORK", "SECR", "GEN", "UPDATED"
                );
                for e in &list.environments {
                    println!(
                        "{:<24} {:<7} {:>4} {:>4}  {:<20} {}",
                        e.name,
                        e.network.as_str(),
                        e.secret_names.len(),
                        e.cache_generation,
                        e.updated_at.format("%Y-%m-%d %H:%M:%S"),
                        e.repo.as_deref().unwrap_or("-")
                    );
                }
            }
        }
        EnvCommand::Show(a) => {
            let r = client
                .get(url(&a.scope, config, Some(&a.name), "")?)
                .send()
                .await
                .context(reach)?;
            let v: EnvironmentView = serde_json::from_str(&answer(r).await?)
                .context("the gateway's answer is not an environment")?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        EnvCommand::Delete(a) => {
            let r = client
                .delete(url(&a.scope, config, Some(&a.name), "")?)
                .send()
                .await
                .context(reach)?;
            answer(r).await?;
            eprintln!("deleted environment {}", a.name);
        }
        EnvCommand::ResetCache(a) => {
            let r = client
                .post(url(&a.scope, config, Some(&a.name), "reset-cache")?)
                .send()
                .await
                .context(reach)?;
            let text = answer(r).await?;
            let v: patchflow_api::ResetCacheAnswer =
                serde_json::from_str(&text).context("the gateway's answer is not a reset")?;
            if a.scope.json {
                println!("{}", serde_json::to_string(&v)?);
            } else {
                println!(
                    "environment {}: cache generation {}, {} cached state(s) removed",
                    v.name, v.cache_generation, v.removed
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn define(args: &[&str]) -> DefineArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            a: DefineArgs,
        }
        let mut all = vec!["x"];
        all.extend_from_slice(args);
        Cli::parse_from(all).a
    }

    #[test]
    fn the_body_reads_scripts_variables_and_secrets_from_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("setup.sh");
        std::fs::write(&script, "pip install .\n").unwrap();
        let s = script.display().to_string();
        let var = "PATCHFLOW_TEST_ENV_SECRET_CLI";
        // Never set by anyone: the refusal path (setting a variable needs `unsafe`).
        let spec = format!("API_KEY={var}");
        let a = define(&[
            "py",
            "--setup-script",
            &s,
            "--env",
            "A=1=2",
            "--secret-env",
            &spec,
            "--network",
            "off",
            "--no-cache",
            "--cache-path",
            "~/.cache/pip",
        ]);
        // The variable is unset: a clear refusal naming it.
        let err = body_of(&a).unwrap_err().to_string();
        assert!(err.contains(var), "{err}");
        let b = define(&["py", "--setup-script", &s, "--env", "A=1=2"]);
        let body = body_of(&b).unwrap();
        assert_eq!(body.setup_script, "pip install .\n");
        assert_eq!(body.env["A"], "1=2");
        assert_eq!(body.secrets, None, "no --secret-env: secrets left out");
        assert_eq!(body.cache, None);
        let c = define(&["py", "--setup-script", &s, "--clear-secrets", "--no-cache"]);
        let body = body_of(&c).unwrap();
        assert_eq!(body.secrets, Some(BTreeMap::new()));
        assert_eq!(body.cache, Some(false));
        assert!(body_of(&define(&["py", "--setup-script", &s, "--env", "NOEQ"])).is_err());
    }
}
