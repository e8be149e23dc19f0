//! Builds a service from its parts and runs it until SIGTERM/SIGINT: the HTTP listener (API,
//! health, readiness, metrics), the outbox relay, the Kafka consumer and any background task.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use axum::Router;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{Service, Settings};
use crate::consumer::{Consumer, Handler};
use crate::kafka::{AuthFailure, Producer};
use crate::metrics::Metrics;
use crate::outbox::{Relay, producer};
use service_kit::telemetry::LogOutput;

/// What every part of a service gets.
#[derive(Clone)]
pub struct Resources {
    /// Which service.
    pub service: Service,
    /// Its settings.
    pub settings: Settings,
    /// Its database (migrated).
    pub pool: PgPool,
    /// Producer for the relay and the DLQ.
    pub producer: Producer,
    /// Context of every Kafka client (records a refused authentication).
    pub kafka: crate::kafka::KafkaContext,
    /// Reports the brokers' refusal of our credentials.
    pub kafka_auth: AuthFailure,
    /// Its metrics.
    pub metrics: Metrics,
    /// Cancelled when the process is stopping.
    pub stop: CancellationToken,
}

type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A service being assembled.
pub struct Builder {
    ctx: Resources,
    api: Router,
    tasks: Vec<(&'static str, Task)>,
}

/// How long stopping tasks may take after the signal.
const GRACE: Duration = Duration::from_secs(10);

impl Builder {
    /// Connects to the database (and migrates it) and prepares the producer.
    pub async fn new(service: Service, settings: Settings) -> anyhow::Result<Self> {
        let pool = crate::db::connect(service, &settings).await?;
        let (kafka, kafka_auth) = crate::kafka::KafkaContext::new();
        let producer = producer(&settings, service.name(), kafka.clone())?;
        let ctx = Resources {
            service,
            kafka,
            kafka_auth,
            metrics: Metrics::new(service.name()),
            settings,
            pool,
            producer,
            stop: CancellationToken::new(),
        };
        Ok(Builder {
            ctx,
            api: Router::new(),
            tasks: Vec::new(),
        })
    }

    /// The shared context.
    pub fn resources(&self) -> &Resources {
        &self.ctx
    }

    /// Adds REST routes (served with CORS and the body limit).
    pub fn api(mut self, routes: Router) -> Self {
        self.api = self.api.merge(routes);
        self
    }

    /// Adds a consumer of `topics` (before the prefix) handled by `handler`.
    pub fn consume<H: Handler>(mut self, topics: &[&str], handler: H) -> anyhow::Result<Self> {
        let ctx = &self.ctx;
        let topics: Vec<String> = topics.iter().map(|t| ctx.settings.topic(t)).collect();
        let consumer = Consumer::new(
            &ctx.settings,
            &ctx.settings.group(ctx.service),
            &topics,
            ctx.pool.clone(),
            ctx.producer.clone(),
            ctx.metrics.clone(),
            ctx.kafka.clone(),
        )?;
        let stop = ctx.stop.clone();
        self.tasks
            .push(("consumer", Box::pin(consumer.run(handler, stop))));
        Ok(self)
    }

    /// Adds a background task that must return once `stop` is cancelled.
    pub fn task(
        mut self,
        name: &'static str,
        task: impl Future<Output = ()> + Send + 'static,
    ) -> Self {
        self.tasks.push((name, Box::pin(task)));
        self
    }

    /// Binds the listener; the service runs when [`Running::run_until_stopped`] is awaited.
    pub async fn bind(mut self) -> anyhow::Result<Running> {
        use anyhow::Context as _;
        let ctx = self.ctx.clone();
        if ctx.settings.outbox_relay {
            let relay = Relay::new(
                ctx.pool.clone(),
                ctx.producer.clone(),
                &ctx.settings,
                ctx.metrics.clone(),
            );
            self.tasks
                .push(("outbox relay", Box::pin(relay.run(ctx.stop.clone()))));
        }
        let addr = ctx.settings.addr(ctx.service);
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} ({}ADDR)", ctx.service.prefix()))?;
        let local = listener.local_addr()?;
        let api = crate::http::with_api_layers(self.api, &ctx.settings.allowed_origins);
        let router = api.merge(crate::http::ops_routes(
            ctx.pool.clone(),
            ctx.metrics.clone(),
            ctx.stop.clone(),
            ctx.kafka_auth.clone(),
        ));
        let router = crate::http::with_timeouts(
            router,
            ctx.settings.http_body_timeout,
            ctx.settings.http_request_timeout,
        );
        // Outermost, so that a 408 of the timeouts carries the request id too.
        let router = crate::http::with_request_ids(router);
        Ok(Running {
            ctx,
            listener,
            local,
            router,
            tasks: self.tasks,
        })
    }
}

/// A bound service.
pub struct Running {
    ctx: Resources,
    listener: TcpListener,
    local: SocketAddr,
    router: Router,
    tasks: Vec<(&'static str, Task)>,
}

impl Running {
    /// The listener's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Runs every part until `signal` completes, then stops them within the grace period. Ends
    /// with an error, after stopping the same way, when the Kafka brokers refuse the service's
    /// credentials (retrying cannot fix that; the operator must).
    pub async fn run_until_stopped(
        self,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let stop = self.ctx.stop.clone();
        let mut set = JoinSet::new();
        for (name, task) in self.tasks {
            set.spawn(async move {
                task.await;
                name
            });
        }
        let server = tokio::spawn(crate::http::serve(
            self.listener,
            self.router,
            self.ctx.settings.http_header_timeout,
            stop.clone(),
        ));
        let refused = tokio::select! {
            () = signal => None,
            refusal = self.ctx.kafka_auth.clone().wait() => Some(refusal),
        };
        tracing::info!("stopping");
        stop.cancel();
        let drained = tokio::time::timeout(GRACE, async {
            while set.join_next().await.is_some() {}
            let _ = server.await;
        })
        .await;
        if drained.is_err() {
            tracing::warn!("stopped before every task finished (grace period over)");
        }
        self.ctx.pool.close().await;
        match refused {
            None => Ok(()),
            Some(refusal) => Err(anyhow::anyhow!(
                "{}",
                refusal.explain(
                    self.ctx.service.prefix(),
                    self.ctx.settings.kafka_sasl_username.as_deref()
                )
            )),
        }
    }
}

/// Adds a service's parts to a [`Builder`].
pub type Build = fn(Builder) -> Pin<Box<dyn Future<Output = anyhow::Result<Builder>> + Send>>;

/// The common `main`: telemetry, settings (one line and exit 2 when bad), build, run.
pub fn main(service: Service, build: Build) -> std::process::ExitCode {
    use clap::Parser as _;
    let args = Args::parse();
    let settings = match Settings::load(service, args.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{}: {e}", service.name());
            return std::process::ExitCode::from(2);
        }
    };
    service_kit::telemetry::init(&settings.log, settings.log_format, LogOutput::Stderr);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{}: cannot start the runtime: {e}", service.name());
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let builder = build(Builder::new(service, settings).await?).await?;
        let running = builder.bind().await?;
        // One line on stdout that scripts and tests wait for.
        println!(
            "{} listening on http://{}",
            service.name(),
            running.local_addr()
        );
        running
            .run_until_stopped(service_kit::signal::shutdown())
            .await
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}: {e:#}", service.name());
            std::process::ExitCode::FAILURE
        }
    }
}

/// Command line of every service binary.
#[derive(clap::Parser)]
struct Args {
    /// TOML file with settings (environment variables override it).
    #[arg(long)]
    config: Option<std::path::PathBuf>,
}
