//! Builds a node from settings, binds its listener, and runs it until shutdown and drain.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::routing::{any, get};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::trace::TraceLayer;

use crate::api::{self, ApiInner, ApiState};
use crate::auth::{OriginPolicy, Verifier};
use crate::backplane::memory::MemoryBackplane;
use crate::backplane::redis::{RedisBackplane, RedisEndpoint, RedisSettings, RedisTelemetry};
use crate::backplane::{Backplane, Sink};
use crate::config::Settings;
use crate::envelope::Notification;
use crate::fanout::{Fanout, Limits};
use crate::ingest::{self, IngestSettings, Routes};
use crate::metrics::IngestMetrics;
use crate::metrics::Metrics;
use crate::shutdown::Lifecycle;
use crate::transport::{Context, ContextInner, Timing, front, gate, sse, ws};

/// Options that come from the command line rather than settings.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `--dev`: a random signing secret and API key unless set, and the dev login.
    pub dev: bool,
}

/// Dev-mode credentials generated at start (printed for the newcomer).
#[derive(Debug, Clone)]
pub struct DevCredentials {
    /// The HS256 secret tokens are signed with.
    pub secret: String,
    /// The publish API key.
    pub api_key: String,
}

/// A bound, ready-to-run hub node.
pub struct Application {
    listener: TcpListener,
    port: u16,
    ctx: Context,
    router: Router,
    lifecycle: Lifecycle,
    fanout: Fanout,
    grace: Duration,
    dev: Option<DevCredentials>,
    background: Vec<tokio::task::JoinHandle<()>>,
    ingest: Option<(IngestSettings, Arc<dyn Backplane>, IngestMetrics)>,
    grpc: Option<(TcpListener, crate::grpc::Publisher)>,
}

/// Hands backplane notifications to the local registry.
struct FanoutSink {
    fanout: Fanout,
}

impl Sink for FanoutSink {
    fn deliver(&self, stream: &str, n: &Arc<Notification>) {
        // A connection whose queue was full is dropped here; its session counts it.
        self.fanout.deliver(stream, n);
    }

    fn disconnect(&self, user: &str) -> usize {
        self.fanout.disconnect(user)
    }

    fn connections(&self, user: &str) -> usize {
        self.fanout.user_connections(user)
    }

    fn channel_members(&self, stream: &str) -> Vec<(Arc<str>, usize)> {
        self.fanout.channel_members(stream)
    }
}

/// Routes and Kafka settings when `HUB_KAFKA_BROKERS` is set; bad routes stop the start.
fn ingest_settings(settings: &Settings) -> anyhow::Result<Option<IngestSettings>> {
    let Some(brokers) = &settings.kafka_brokers else {
        return Ok(None);
    };
    let pool = prost_reflect::DescriptorPool::decode(proto::FILE_DESCRIPTOR_SET)
        .map_err(|e| anyhow::anyhow!("event contracts: {e}"))?;
    let routes = Routes::load(
        &pool,
        settings.ingest_routes.as_deref(),
        settings.ingest_builtin_routes,
    )?;
    Ok(Some(IngestSettings {
        brokers: brokers.clone(),
        group: settings.kafka_group.clone(),
        routes: Arc::new(routes),
        max_record_bytes: settings.ingest_max_record_bytes,
        security: settings.kafka_security(),
        linger: settings.ingest_linger,
    }))
}

/// `hub ingest`: Kafka ingest alone, publishing into the Redis backplane, until `shutdown`.
pub async fn run_ingest_only(
    settings: Settings,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let Some(ingest) = ingest_settings(&settings)? else {
        anyhow::bail!("config: HUB_KAFKA_BROKERS: required by `hub ingest`");
    };
    let Some(endpoint) = settings.redis_endpoint() else {
        anyhow::bail!(
            "config: HUB_REDIS_URL: required by `hub ingest` (or HUB_REDIS_CLUSTER_URLS or HUB_REDIS_SENTINEL_URLS; nodes read history from Redis)"
        );
    };
    struct Discard;
    impl Sink for Discard {
        fn deliver(&self, _: &str, _: &Arc<Notification>) {}
        fn disconnect(&self, _: &str) -> usize {
            0
        }
    }
    let metrics = Metrics::new();
    let (redis, task) = connect_redis(&settings, endpoint, Arc::new(Discard), &metrics).await?;
    let stop = CancellationToken::new();
    let ingest_metrics = metrics.ingest(&ingest.routes.topics());
    let mut run = tokio::spawn(ingest::run(
        ingest,
        Arc::new(redis),
        ingest_metrics,
        stop.clone(),
    ));
    // Ingest ends on the signal, or by itself when it cannot go on (refused credentials).
    let result = tokio::select! {
        () = shutdown => {
            stop.cancel();
            tokio::time::timeout(settings.shutdown_grace, run).await
        }
        ended = &mut run => Ok(ended),
    };
    task.abort();
    match result {
        Ok(Ok(r)) => r.map_err(Into::into),
        Ok(Err(e)) => Err(anyhow::anyhow!("ingest task: {e}")),
        Err(_) => Err(anyhow::anyhow!(
            "ingest did not stop within HUB_SHUTDOWN_GRACE"
        )),
    }
}

fn redis_settings(settings: &Settings, endpoint: RedisEndpoint) -> RedisSettings {
    RedisSettings {
        endpoint,
        ca_file: settings.redis_ca_file.clone(),
        prefix: settings.redis_prefix.clone(),
        pool_size: settings.redis_pool_size,
        linger: settings.publish_linger,
        timeout: settings.redis_timeout,
        sync_replicas: settings.redis_sync_replicas,
        presence_timeout: settings.presence_timeout,
        history_size: settings.history_size,
        history_ttl: settings.history_ttl,
        idempotency_ttl: settings.idempotency_ttl,
        event_window: settings.dedupe_window,
    }
}

/// Binds with a deep accept backlog: connection storms (a node restart sends every client
/// back at once) should queue in the kernel, not be refused.
fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Makes request ids: a random 64-bit value in hex, for requests that come without one.
#[derive(Clone, Copy)]
struct RequestIds;

impl tower_http::request_id::MakeRequestId for RequestIds {
    fn make_request_id<B>(
        &mut self,
        _: &http::Request<B>,
    ) -> Option<tower_http::request_id::RequestId> {
        let id = format!("{:016x}", rand::random::<u64>());
        http::HeaderValue::from_str(&id)
            .ok()
            .map(tower_http::request_id::RequestId::new)
    }
}

/// Forgets per-user handshake rate state that has been idle, so the limiter's memory follows
/// the users connecting now, not every user ever seen.
fn spawn_rate_sweeper(ctx: Context) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(30));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            ctx.user_rate.retain_recent();
            ctx.user_rate.shrink_to_fit();
        }
    })
}

/// The state every client connection shares.
fn client_context(
    settings: &Settings,
    verifier: Verifier,
    fanout: Fanout,
    backplane: Arc<dyn Backplane>,
    metrics: Metrics,
    lifecycle: Lifecycle,
) -> Context {
    Context::new(ContextInner {
        verifier,
        origins: OriginPolicy::new(&settings.allowed_origins),
        fanout,
        backplane,
        metrics,
        lifecycle,
        gate: gate::Gate::new(
            settings.max_connections_per_ip,
            settings.max_pending_handshakes,
        ),
        user_rate: crate::transport::user_rate(
            settings.user_handshakes_per_second,
            settings.user_handshake_burst,
        ),
        ws_inbound: crate::transport::ws_inbound(settings.ws_messages_per_second),
        max_channels: settings.max_channels_per_connection,
        timing: Timing {
            ping_interval: settings.ping_interval,
            pong_timeout: settings.pong_timeout,
            handshake_timeout: settings.handshake_timeout,
            write_timeout: settings.write_timeout,
            sse_retry: settings.sse_retry,
            drain_window: settings.drain_window,
        },
    })
}

/// The Redis backplane on `endpoint`, reporting into `metrics`; a Redis that cannot be
/// reached at start is reported as the setting that named it.
async fn connect_redis(
    settings: &Settings,
    endpoint: RedisEndpoint,
    sink: Arc<dyn Sink>,
    metrics: &Metrics,
) -> anyhow::Result<(RedisBackplane, tokio::task::JoinHandle<()>)> {
    let setting = match endpoint {
        RedisEndpoint::Single(_) => "HUB_REDIS_URL",
        RedisEndpoint::Cluster(_) => "HUB_REDIS_CLUSTER_URLS",
        RedisEndpoint::Sentinel { .. } => "HUB_REDIS_SENTINEL_URLS",
    };
    let telemetry = RedisTelemetry {
        reconnects: metrics.backplane_reconnects().clone(),
        lag_seconds: metrics.backplane_lag().clone(),
        shard_up: metrics.backplane_shard_up().clone(),
        shard_recoveries: metrics.backplane_shard_recoveries().clone(),
        presence_reports: metrics.presence_reports().clone(),
    };
    RedisBackplane::connect(redis_settings(settings, endpoint), sink, telemetry)
        .await
        .map_err(|e| anyhow::anyhow!("config: {setting}: {e}"))
}

/// The Redis backplane when `HUB_REDIS_URL` (or `HUB_REDIS_CLUSTER_URLS`, or
/// `HUB_REDIS_SENTINEL_URLS`) is set, else the in-process one; with the task that keeps it
/// (pub/sub or the history sweeper).
async fn connect_backplane(
    settings: &Settings,
    sink: Arc<FanoutSink>,
    metrics: &Metrics,
) -> anyhow::Result<(Arc<dyn Backplane>, tokio::task::JoinHandle<()>)> {
    match settings.redis_endpoint() {
        Some(endpoint) => {
            let (redis, task) = connect_redis(settings, endpoint, sink, metrics).await?;
            Ok((Arc::new(redis), task))
        }
        None => {
            let memory = MemoryBackplane::new(sink, settings.history_size, settings.history_ttl)
                .with_dedupe(settings.idempotency_ttl, settings.dedupe_window);
            let task = memory.spawn_sweeper();
            Ok((Arc::new(memory), task))
        }
    }
}

impl DevCredentials {
    /// The configured secret and API key, or fresh random ones.
    fn for_settings(settings: &Settings) -> Self {
        DevCredentials {
            secret: settings
                .jwt_secret
                .clone()
                .unwrap_or_else(|| random_hex(32)),
            api_key: settings.api_key.clone().unwrap_or_else(|| random_hex(24)),
        }
    }
}

/// The secret `--dev` signs tokens with, when the node verifies with it: when no key is
/// configured, or the configured key is that secret.
fn dev_token_secret(settings: &Settings, dev: Option<&DevCredentials>) -> Option<String> {
    let has_key = settings.jwt_secret.is_some()
        || settings.jwt_public_key_file.is_some()
        || settings.jwt_jwks_url.is_some();
    dev.filter(|_| !has_key || settings.jwt_secret.is_some())
        .map(|d| d.secret.clone())
}
/// Every HTTP route of a node: the API, and `/ws` and `/sse` for clients that do not come
/// through the front door, with the request id, tracing and body timeout layers.
fn router(api: Router, ctx: Context, handshake_timeout: Duration) -> Router {
    let transport = Router::new()
        .route("/ws", get(ws::handler))
        .route("/sse", any(sse::handler))
        .with_state(ctx.clone());
    api.merge(transport)
        // A request body that does not arrive within the handshake timeout ends the
        // request (heads are bounded by hyper, writes by the connection's write timeout).
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            handshake_timeout,
        ))
        // The request id (`x-request-id`: the caller's, or a fresh one) is in every log
        // line of the request and in the response.
        .layer(tower_http::request_id::PropagateRequestIdLayer::x_request_id())
        .layer(
            // Spans carry the path only: the query string may hold a token.
            TraceLayer::new_for_http()
                .make_span_with(|req: &http::Request<_>| {
                    let request_id = req
                        .headers()
                        .get("x-request-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default();
                    tracing::info_span!("http", method = %req.method(), path = %req.uri().path(), request_id)
                })
                // A 503 (draining, backplane down) is expected and counted elsewhere;
                // it is not an error in the node's own log.
                .on_request(tower_http::trace::DefaultOnRequest::new().level(tracing::Level::DEBUG))
                .on_response(tower_http::trace::DefaultOnResponse::new().level(tracing::Level::DEBUG))
                .on_failure(
                    tower_http::trace::DefaultOnFailure::new().level(tracing::Level::DEBUG),
                ),
        )
        .layer(tower_http::request_id::SetRequestIdLayer::x_request_id(
            RequestIds,
        ))
}

fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

impl Application {
    /// Builds every part and binds the listener (port 0 picks a free port).
    pub async fn build(settings: Settings, options: Options) -> anyhow::Result<Self> {
        let dev = options.dev.then(|| DevCredentials::for_settings(&settings));
        let dev_secret = dev_token_secret(&settings, dev.as_ref());
        let verifier = Verifier::from_settings(&settings, dev_secret.as_deref())?;
        let mut background = Vec::new();
        if let Some(jwks) = verifier.jwks() {
            background.push(jwks.spawn_refresher(settings.jwt_jwks_refresh));
        }

        let metrics = Metrics::new();
        let fanout = Fanout::new(Limits {
            max_connections: settings.max_connections,
            max_per_user: settings.max_connections_per_user,
            queue: settings.send_queue,
            max_channel_subscribers: settings.max_channel_subscribers,
        })
        .with_gauges(
            metrics.channels().clone(),
            metrics.channel_subscriptions().clone(),
        );
        let sink = Arc::new(FanoutSink {
            fanout: fanout.clone(),
        });
        let (backplane, task) = connect_backplane(&settings, sink, &metrics).await?;
        background.push(task);

        let ingest = ingest_settings(&settings)?.map(|i| {
            let m = metrics.ingest(&i.routes.topics());
            (i, backplane.clone(), m)
        });

        let lifecycle = Lifecycle::new();
        let ctx = client_context(
            &settings,
            verifier,
            fanout.clone(),
            backplane.clone(),
            metrics.clone(),
            lifecycle.clone(),
        );
        let api_key = dev
            .as_ref()
            .map(|d| d.api_key.clone())
            .or(settings.api_key.clone());
        let grpc = match settings.grpc_addr {
            Some(addr) => Some((
                bind(addr)
                    .with_context(|| format!("config: HUB_GRPC_ADDR: cannot listen on {addr}"))?,
                crate::grpc::Publisher::new(backplane.clone(), metrics.clone(), api_key.clone()),
            )),
            None => None,
        };
        let api = api::router(ApiState::new(ApiInner {
            backplane,
            metrics,
            lifecycle: lifecycle.clone(),
            api_key,
            dev_secret: dev_secret.filter(|_| options.dev),
            audience: settings.jwt_audience.clone(),
            issuer: settings.jwt_issuer.clone(),
            revocation_ttl: settings.jwt_max_lifetime + settings.jwt_leeway,
        }));
        background.push(spawn_rate_sweeper(ctx.clone()));
        let router = router(api, ctx.clone(), settings.handshake_timeout);

        let listener = bind(settings.addr)
            .with_context(|| format!("config: HUB_ADDR: cannot listen on {}", settings.addr))?;
        let port = listener.local_addr()?.port();
        Ok(Application {
            listener,
            port,
            ctx,
            router,
            lifecycle,
            fanout,
            grace: settings.shutdown_grace,
            dev,
            background,
            ingest,
            grpc,
        })
    }

    /// The gRPC listener's port, when `HUB_GRPC_ADDR` is set.
    pub fn grpc_port(&self) -> Option<u16> {
        self.grpc
            .as_ref()
            .and_then(|(l, _)| l.local_addr().ok())
            .map(|a| a.port())
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Dev credentials, with `--dev`.
    pub fn dev_credentials(&self) -> Option<&DevCredentials> {
        self.dev.as_ref()
    }

    /// The node's drain state.
    pub fn lifecycle(&self) -> Lifecycle {
        self.lifecycle.clone()
    }

    /// Serves until `shutdown` resolves, then drains: readiness 503, new client connections
    /// refused, open ones closed over the drain window; returns when all are closed or the
    /// grace period is over.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let stop = CancellationToken::new();
        let server = tokio::spawn(front::serve(
            self.listener,
            self.ctx,
            self.router,
            stop.clone().cancelled_owned(),
        ));
        let grpc = self.grpc.map(|(listener, publisher)| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let incoming =
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
                let served = tonic::transport::Server::builder()
                    .add_service(publisher.server())
                    .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                    .await;
                if let Err(e) = served {
                    tracing::error!(error = %e, "gRPC server failed");
                }
            })
        });
        let ingest_stop = CancellationToken::new();
        let ingest = self.ingest.map(|(settings, backplane, metrics)| {
            let stop = ingest_stop.clone();
            tokio::spawn(async move {
                let result = ingest::run(settings, backplane, metrics, stop).await;
                // Said when it happens (hub_ingest_failed turns 1), not at shutdown.
                if let Err(e) = &result {
                    tracing::error!(error = %e, "ingest stopped; the node goes on serving without it");
                }
                result
            })
        });
        shutdown.await;
        tracing::info!(connections = self.fanout.connections(), "draining");
        self.lifecycle.start_drain();
        // Ingest finishes its in-flight records, commits and stops while clients drain.
        ingest_stop.cancel();
        if let Some(task) = ingest
            && tokio::time::timeout(self.grace, task).await.is_err()
        {
            tracing::warn!("ingest did not stop within the grace period");
        }
        let _ = tokio::time::timeout(self.grace, self.fanout.all_closed()).await;
        let left = self.fanout.connections();
        if left > 0 {
            tracing::warn!(
                connections = left,
                "grace period over, exiting with connections open"
            );
        }
        stop.cancel();
        let _ = server.await;
        if let Some(grpc) = grpc {
            let _ = grpc.await;
        }
        for task in self.background {
            task.abort();
        }
        tracing::info!("stopped");
        Ok(())
    }
}
