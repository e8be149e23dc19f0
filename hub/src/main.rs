//! `hub`: the node binary. Parses the command line, loads settings, starts telemetry, runs.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use hub::app::{Application, Options};
use hub::config::{Environment, Settings};
use service_kit::telemetry::LogOutput;

/// mimalloc instead of glibc's allocator: a third less CPU per delivery (every notification
/// and pub/sub message allocates), for about 0.5 KiB more per idle connection
/// (docs/benchmarks.md, "The allocator").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "hub", version, about = "Real-time notification hub")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a hub node.
    Serve {
        /// TOML settings file (environment variables override it).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Development mode: random secret and API key unless set, dev login, sample token.
        #[arg(long)]
        dev: bool,
    },
    /// Run Kafka ingest alone (publishing into the Redis backplane), to scale it separately.
    Ingest {
        /// TOML settings file (environment variables override it).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print a token signed with the configured HS256 secret.
    Token {
        /// The user (`sub`).
        #[arg(long)]
        sub: String,
        /// Lifetime, e.g. 30m, 1h, 7d.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Audience (`aud`); defaults to HUB_JWT_AUDIENCE when that is set.
        #[arg(long)]
        aud: Option<String>,
        /// TOML settings file.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config, dev } => serve(config, dev),
        Command::Ingest { config } => ingest(config),
        Command::Token {
            sub,
            ttl,
            aud,
            config,
        } => token(&sub, ttl, aud, config),
    }
}

fn load(config: Option<PathBuf>) -> Result<Settings, ExitCode> {
    Settings::load(config.as_deref()).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(2)
    })
}

fn token(sub: &str, ttl: Duration, aud: Option<String>, config: Option<PathBuf>) -> ExitCode {
    let settings = match load(config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let Some(secret) = settings.jwt_secret else {
        eprintln!("config: HUB_JWT_SECRET: required to sign tokens");
        return ExitCode::from(2);
    };
    if let Err(e) = hub::envelope::check_user_id(sub) {
        eprintln!("--sub: {e}");
        return ExitCode::from(2);
    }
    if ttl > settings.jwt_max_lifetime {
        eprintln!(
            "--ttl: longer than HUB_JWT_MAX_LIFETIME ({}); the hub would refuse the token",
            humantime::format_duration(settings.jwt_max_lifetime)
        );
        return ExitCode::from(2);
    }
    let aud = aud.or(settings.jwt_audience);
    match hub::auth::sign_hs256_for(
        &secret,
        sub,
        ttl,
        aud.as_deref(),
        settings.jwt_issuer.as_deref(),
    ) {
        Ok(t) => {
            println!("{t}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cannot sign: {e}");
            ExitCode::FAILURE
        }
    }
}

fn ingest(config: Option<PathBuf>) -> ExitCode {
    let settings = match load(config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    init_telemetry(&settings);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(hub::app::run_ingest_only(
        settings,
        service_kit::signal::shutdown(),
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e:#}");
            ExitCode::from(2)
        }
    }
}

/// The node's runtime: `HUB_WORKER_THREADS` workers (one per CPU when 0).
fn runtime(settings: &Settings) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if settings.worker_threads > 0 {
        builder.worker_threads(settings.worker_threads);
    }
    builder.build()
}

fn init_telemetry(settings: &Settings) {
    service_kit::telemetry::init(&settings.log, settings.log_format, LogOutput::Stdout);
}

/// What a node started this way will surprise its operator with.
fn start_warnings(settings: &Settings, dev: bool) -> Vec<&'static str> {
    let mut out = Vec::new();
    if settings.api_key.is_none() && !dev {
        out.push(
            "HUB_API_KEY is not set: the publish and disconnect APIs answer 401 to every request",
        );
    }
    if settings.allowed_origins.is_empty() && !dev {
        out.push("HUB_ALLOWED_ORIGINS is empty: pages from any origin may open /ws and /sse with a token (the hub_token cookie is never used); list your origins");
    }
    out
}

fn serve(config: Option<PathBuf>, dev: bool) -> ExitCode {
    let settings = match load(config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    if dev && settings.env == Environment::Production {
        eprintln!("config: HUB_ENV: --dev is refused when HUB_ENV=production");
        return ExitCode::from(2);
    }
    init_telemetry(&settings);
    // Each client is a socket: use every file descriptor the hard limit allows.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(limit = n, "open files limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open files limit"),
    }
    let runtime = match runtime(&settings) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let warnings = start_warnings(&settings, dev);
    let (audience, issuer) = (settings.jwt_audience.clone(), settings.jwt_issuer.clone());
    runtime.block_on(async move {
        let app = match Application::build(settings, Options { dev }).await {
            Ok(app) => app,
            Err(e) => {
                eprintln!("{e:#}");
                return ExitCode::from(2);
            }
        };
        let addr = app
            .local_addr()
            .map_or_else(|_| format!("port {}", app.port()), |a| a.to_string());
        tracing::info!(%addr, "hub listening");
        for w in warnings {
            tracing::warn!("{w}");
        }
        if let Some(creds) = app.dev_credentials() {
            println!("hub: dev mode on {addr}");
            if app.local_addr().is_ok_and(|a| a.ip().is_loopback()) {
                let sample = hub::auth::sign_hs256_for(
                    &creds.secret,
                    "demo",
                    Duration::from_secs(3600),
                    audience.as_deref(),
                    issuer.as_deref(),
                )
                .unwrap_or_default();
                println!("hub: HUB_JWT_SECRET={}", creds.secret);
                println!("hub: HUB_API_KEY={}", creds.api_key);
                println!("hub: sample token for user \"demo\" (1h): {sample}");
            } else {
                // Secrets on a terminal are fine for a loopback toy, not for a node others
                // can reach; set HUB_JWT_SECRET and HUB_API_KEY yourself to know them.
                println!(
                    "hub: listening beyond loopback: the generated secret and API key are not printed, and the dev login answers loopback clients only"
                );
            }
        }
        match app.run_until_stopped(service_kit::signal::shutdown()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{e:#}");
                ExitCode::FAILURE
            }
        }
    })
}
