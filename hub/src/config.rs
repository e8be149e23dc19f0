//! Typed settings from the environment (`HUB_*`) and an optional TOML file, validated at start.
//!
//! This is the only module that reads the environment. Every setting has a default so the hub
//! runs with nothing configured but a token key; a bad or contradictory value stops the process
//! with one line naming the setting (see [`ConfigError`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Serialized};
use kafka_runtime::{SaslMechanism, Security, SecurityProtocol};
use serde::{Deserialize, Serialize};
use service_kit::settings::{self, at_least, within};
pub use service_kit::{ConfigError, LogFormat};

/// Shortest accepted HS256 secret, in bytes (RFC 7518 §3.2: at least the hash size).
pub const MIN_SECRET_LEN: usize = 32;
/// Largest accepted clock leeway for `exp` / `nbf`.
pub const MAX_LEEWAY: Duration = Duration::from_secs(60);

/// Deployment environment; `production` refuses `--dev`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    /// Local development (the default).
    Development,
    /// Production: dev conveniences are refused.
    Production,
}

/// Every setting of a hub node. Field `x` is read from `HUB_X` or key `x` of the TOML file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Client and API listener.
    pub addr: SocketAddr,
    /// Listener of the gRPC publish API; off when unset.
    #[serde(default)]
    pub grpc_addr: Option<SocketAddr>,
    /// HS256 secret.
    #[serde(default, deserialize_with = "settings::opt_text")]
    pub jwt_secret: Option<String>,
    /// PEM public key (RSA, EC P-256 or Ed25519) for RS256 / ES256 / EdDSA.
    #[serde(default)]
    pub jwt_public_key_file: Option<PathBuf>,
    /// JWKS endpoint.
    #[serde(default, deserialize_with = "settings::opt_text")]
    pub jwt_jwks_url: Option<String>,
    /// Required `iss`, when set.
    #[serde(default, deserialize_with = "settings::opt_text")]
    pub jwt_issuer: Option<String>,
    /// Required `aud`, when set.
    #[serde(default, deserialize_with = "settings::opt_text")]
    pub jwt_audience: Option<String>,
    /// Clock leeway for `exp` and `nbf` (at most 60 s).
    #[serde(with = "humantime_serde")]
    pub jwt_leeway: Duration,
    /// Longest token lifetime accepted: a token whose `exp` lies further ahead is refused.
    #[serde(with = "humantime_serde")]
    pub jwt_max_lifetime: Duration,
    /// Shortest interval between two JWKS refreshes triggered by an unknown `kid`.
    #[serde(with = "humantime_serde")]
    pub jwt_jwks_min_refresh: Duration,
    /// Periodic JWKS refresh, so removed keys stop being accepted.
    #[serde(with = "humantime_serde")]
    pub jwt_jwks_refresh: Duration,
    /// Bearer key for the publish API.
    #[serde(default, deserialize_with = "settings::opt_text")]
    pub api_key: Option<String>,
    /// Exact origins allowed to connect (comma-separated in the environment).
    #[serde(default, deserialize_with = "settings::text_list")]
    pub allowed_origins: Vec<String>,
    /// Redis backplane and history.
    #[serde(default, deserialize_with = "settings::opt_text")]
    pub redis_url: Option<String>,
    /// Seed URLs of a Redis Cluster (comma-separated in the environment), instead of
    /// `redis_url`.
    #[serde(default, deserialize_with = "settings::text_list")]
    pub redis_cluster_urls: Vec<String>,
    /// Redis Sentinels (comma-separated `redis://` URLs in the environment), instead of
    /// `redis_url`: the backplane uses the master they name for `redis_sentinel_master`.
    #[serde(default, deserialize_with = "settings::text_list")]
    pub redis_sentinel_urls: Vec<String>,
    /// The master's name the Sentinels monitor.
    #[serde(default, deserialize_with = "settings::opt_text")]
    pub redis_sentinel_master: Option<String>,
    /// Password of the master and replicas the Sentinels name (the Sentinels' own, if any,
    /// rides in their URLs).
    #[serde(default, deserialize_with = "settings::opt_text")]
    pub redis_sentinel_password: Option<String>,
    /// PEM CA bundle for a `rediss://` server certificate.
    #[serde(default)]
    pub redis_ca_file: Option<PathBuf>,
    /// Key and channel prefix in Redis (several deployments can share one Redis).
    pub redis_prefix: String,
    /// Single publishes wait up to this long to share a Redis script call with others (more
    /// notifications per call, fewer wakeups everywhere; adds up to this much latency).
    #[serde(with = "humantime_serde")]
    pub publish_linger: Duration,
    /// Worker threads of the node's runtime; 0 means one per CPU.
    pub worker_threads: usize,
    /// Multiplexed command connections to Redis per node (each pipelines every concurrent
    /// command).
    pub redis_pool_size: usize,
    /// A Redis command (or connection attempt) that takes longer fails: publishes answer 503
    /// instead of hanging while Redis is unreachable.
    #[serde(with = "humantime_serde")]
    pub redis_timeout: Duration,
    /// A node that stopped reporting presence for this long is counted out (its connections
    /// leave presence); nodes report every quarter of it.
    #[serde(with = "humantime_serde")]
    pub presence_timeout: Duration,
    /// Replicas that must have a notification before its publish is acknowledged (Redis
    /// `WAIT`), so a failover to one of them loses nothing acknowledged; 0: no wait.
    pub redis_sync_replicas: u32,
    /// Kafka ingest: bootstrap brokers (`host:port,...`).
    #[serde(default, deserialize_with = "settings::opt_text")]
    pub kafka_brokers: Option<String>,
    /// Kafka consumer group of ingest.
    pub kafka_group: String,
    /// Kafka `security.protocol`: plaintext, ssl, sasl_plaintext or sasl_ssl.
    pub kafka_security_protocol: SecurityProtocol,
    /// Kafka `sasl.mechanism`: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (`PLAIN` when unset).
    #[serde(default)]
    pub kafka_sasl_mechanism: Option<SaslMechanism>,
    /// Kafka SASL user name.
    #[serde(default, deserialize_with = "settings::opt_text")]
    pub kafka_sasl_username: Option<String>,
    /// Kafka SASL password.
    #[serde(default, deserialize_with = "settings::opt_text")]
    pub kafka_sasl_password: Option<String>,
    /// PEM CA bundle for the brokers' certificates (`ssl.ca.location`).
    #[serde(default)]
    pub kafka_ssl_ca_file: Option<PathBuf>,
    /// Largest Kafka record value ingest accepts; a larger one goes to the DLQ.
    pub ingest_max_record_bytes: usize,
    /// How long the Kafka broker may hold a fetch for more records, so they come in groups
    /// that share one backplane call (zero: each fetch answered as soon as a record is there).
    #[serde(with = "humantime_serde")]
    pub ingest_linger: Duration,
    /// A TOML file of routes beyond the built-in ones.
    #[serde(default)]
    pub ingest_routes: Option<PathBuf>,
    /// Whether ingest has the built-in routes (`order.status.changed`, `moderation.results`);
    /// off, only the routes file's topics are consumed.
    pub ingest_builtin_routes: bool,
    /// Notifications kept per user for resume.
    pub history_size: usize,
    /// How long a user's history lives after its last notification.
    #[serde(with = "humantime_serde")]
    pub history_ttl: Duration,
    /// How long an API idempotency key is remembered after its first publish.
    #[serde(with = "humantime_serde")]
    pub idempotency_ttl: Duration,
    /// Ingested events remembered per user for dedupe (a redelivery is recognized while the
    /// original is among the user's last this many ingested events).
    pub dedupe_window: usize,
    /// WebSocket ping / SSE heartbeat interval.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// How long a WebSocket may stay silent after a ping before it is closed.
    #[serde(with = "humantime_serde")]
    pub pong_timeout: Duration,
    /// Time allowed to receive a request head and complete the handshake.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// A write to a client that makes no progress for this long closes the connection.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Notifications queued per connection before the client counts as a slow consumer.
    pub send_queue: usize,
    /// Open client connections per node (over it: 503).
    pub max_connections: usize,
    /// Open client connections per user on one node (over it: 429).
    pub max_connections_per_user: usize,
    /// Channels one connection may follow (token claim and WebSocket subscriptions), at
    /// most 64 (the one cursor's capacity).
    pub max_channels_per_connection: usize,
    /// Connections subscribed to one channel on one node.
    pub max_channel_subscribers: usize,
    /// Open TCP connections from one client address, counted from accept (before any auth);
    /// beyond it a new connection is closed at once.
    pub max_connections_per_ip: usize,
    /// Connections still reading their request head or in the handshake; beyond it a new
    /// connection is closed at once.
    pub max_pending_handshakes: usize,
    /// Handshakes per second per user (token `sub`) on one node; bursts up to
    /// `HUB_USER_HANDSHAKE_BURST`. Over it: 429.
    pub user_handshakes_per_second: u32,
    /// Burst of handshakes one user may make at once.
    pub user_handshake_burst: u32,
    /// Client → server WebSocket messages per second per connection (bursts up to twice
    /// that); a client sending faster is closed with 1008.
    pub ws_messages_per_second: u32,
    /// SSE `retry:` hint sent at connect.
    #[serde(with = "humantime_serde")]
    pub sse_retry: Duration,
    /// On SIGTERM, client connections are closed spread over this window.
    #[serde(with = "humantime_serde")]
    pub drain_window: Duration,
    /// On SIGTERM, the process exits at the latest after this long.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Deployment environment.
    pub env: Environment,
    /// Tracing filter.
    pub log: String,
    /// Log format.
    pub log_format: LogFormat,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([0, 0, 0, 0], 8080)),
            grpc_addr: None,
            jwt_secret: None,
            jwt_public_key_file: None,
            jwt_jwks_url: None,
            jwt_issuer: None,
            jwt_audience: None,
            jwt_leeway: Duration::from_secs(30),
            jwt_max_lifetime: Duration::from_secs(24 * 3600),
            jwt_jwks_min_refresh: Duration::from_secs(10),
            jwt_jwks_refresh: Duration::from_secs(600),
            api_key: None,
            allowed_origins: Vec::new(),
            redis_url: None,
            redis_cluster_urls: Vec::new(),
            redis_sentinel_urls: Vec::new(),
            redis_sentinel_master: None,
            redis_sentinel_password: None,
            redis_ca_file: None,
            redis_prefix: "hub".to_owned(),
            redis_pool_size: 2,
            publish_linger: Duration::ZERO,
            worker_threads: 0,
            redis_timeout: Duration::from_secs(2),
            redis_sync_replicas: 0,
            presence_timeout: Duration::from_secs(20),
            kafka_brokers: None,
            kafka_group: "hub-ingest".to_owned(),
            kafka_security_protocol: SecurityProtocol::Plaintext,
            kafka_sasl_mechanism: None,
            kafka_sasl_username: None,
            kafka_sasl_password: None,
            kafka_ssl_ca_file: None,
            ingest_max_record_bytes: 64 * 1024,
            ingest_linger: Duration::ZERO,
            ingest_routes: None,
            ingest_builtin_routes: true,
            history_size: 100,
            history_ttl: Duration::from_secs(24 * 3600),
            idempotency_ttl: Duration::from_secs(600),
            dedupe_window: 96,
            ping_interval: Duration::from_secs(25),
            pong_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            send_queue: 256,
            max_connections: 100_000,
            max_connections_per_user: 32,
            max_channels_per_connection: 16,
            max_channel_subscribers: 100_000,
            max_connections_per_ip: 1000,
            max_pending_handshakes: 1024,
            user_handshakes_per_second: 10,
            user_handshake_burst: 40,
            ws_messages_per_second: 10,
            sse_retry: Duration::from_secs(2),
            drain_window: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(30),
            env: Environment::Development,
            log: "info".to_owned(),
            log_format: LogFormat::Text,
        }
    }
}

/// Environment variables that belong to the hub but are not settings of [`Settings`].
const NOT_SETTINGS: &[&str] = &["CONFIG"];

impl Settings {
    /// Loads defaults, then the TOML file (if any), then `HUB_*` variables from the environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(file, Env::prefixed("HUB_").ignore(NOT_SETTINGS))
    }

    /// Loads from explicit key/value pairs instead of the process environment (for tests).
    pub fn load_from_pairs<'a>(
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, ConfigError> {
        let defaults = Figment::from(Serialized::defaults(Settings::default()));
        Self::extract(settings::with_pairs(defaults, "HUB_", pairs))
    }

    fn load_from(file: Option<&Path>, env: Env) -> Result<Self, ConfigError> {
        let figment = Figment::from(Serialized::defaults(Settings::default()));
        Self::extract(settings::with_file(figment, file)?.merge(env))
    }

    fn extract(figment: Figment) -> Result<Self, ConfigError> {
        let settings: Settings = figment
            .extract()
            .map_err(|e| ConfigError::from_figment("HUB_", &e))?;
        settings.validate()?;
        Ok(settings)
    }

    /// Cross-field and range checks that the types alone do not express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_auth()?;
        self.validate_api()?;
        self.validate_redis()?;
        self.validate_ingest()?;
        self.validate_capacity()?;
        self.validate_timing()?;
        Ok(())
    }

    /// Token keys and claims limits.
    fn validate_auth(&self) -> Result<(), ConfigError> {
        let keys = [
            self.jwt_secret.is_some(),
            self.jwt_public_key_file.is_some(),
            self.jwt_jwks_url.is_some(),
        ]
        .iter()
        .filter(|set| **set)
        .count();
        if keys > 1 {
            return Err(ConfigError::new(
                "HUB_JWT_SECRET",
                "set only one of HUB_JWT_SECRET, HUB_JWT_PUBLIC_KEY_FILE and HUB_JWT_JWKS_URL",
            ));
        }
        if let Some(secret) = &self.jwt_secret
            && secret.len() < MIN_SECRET_LEN
        {
            return Err(ConfigError::new(
                "HUB_JWT_SECRET",
                format!(
                    "must be at least {MIN_SECRET_LEN} bytes, got {}",
                    secret.len()
                ),
            ));
        }
        if let Some(path) = &self.jwt_public_key_file
            && !path.is_file()
        {
            return Err(ConfigError::new(
                "HUB_JWT_PUBLIC_KEY_FILE",
                format!("{} is not a readable file", path.display()),
            ));
        }
        if let Some(url) = &self.jwt_jwks_url
            && !(url.starts_with("https://") || url.starts_with("http://"))
        {
            return Err(ConfigError::new(
                "HUB_JWT_JWKS_URL",
                "must be an http:// or https:// URL",
            ));
        }
        if self.jwt_leeway > MAX_LEEWAY {
            return Err(ConfigError::new("HUB_JWT_LEEWAY", "must be at most 60s"));
        }
        at_least(
            "HUB_JWT_MAX_LIFETIME",
            self.jwt_max_lifetime,
            Duration::from_secs(60),
        )?;
        if self.jwt_max_lifetime > Duration::from_secs(366 * 24 * 3600) {
            return Err(ConfigError::new(
                "HUB_JWT_MAX_LIFETIME",
                "must be at most 366d",
            ));
        }
        Ok(())
    }

    /// The API key and the allowed origins.
    fn validate_api(&self) -> Result<(), ConfigError> {
        if matches!(&self.api_key, Some(k) if k.len() < 16) {
            return Err(ConfigError::new(
                "HUB_API_KEY",
                "must be at least 16 characters",
            ));
        }
        for origin in &self.allowed_origins {
            if !(origin.starts_with("http://") || origin.starts_with("https://"))
                || origin.ends_with('/')
            {
                return Err(ConfigError::new(
                    "HUB_ALLOWED_ORIGINS",
                    format!("{origin:?} is not an origin like https://app.example.com"),
                ));
            }
        }
        Ok(())
    }

    /// The Redis the backplane uses, if any.
    pub fn redis_endpoint(&self) -> Option<crate::backplane::redis::RedisEndpoint> {
        use crate::backplane::redis::RedisEndpoint;
        match &self.redis_url {
            Some(url) => Some(RedisEndpoint::Single(url.clone())),
            None if !self.redis_cluster_urls.is_empty() => {
                Some(RedisEndpoint::Cluster(self.redis_cluster_urls.clone()))
            }
            None if !self.redis_sentinel_urls.is_empty() => Some(RedisEndpoint::Sentinel {
                sentinels: self.redis_sentinel_urls.clone(),
                master: self.redis_sentinel_master.clone().unwrap_or_default(),
                password: self.redis_sentinel_password.clone(),
            }),
            None => None,
        }
    }

    /// The Redis backplane and the publish path.
    fn validate_redis(&self) -> Result<(), ConfigError> {
        let is_url = |url: &str| url.starts_with("redis://") || url.starts_with("rediss://");
        if let Some(url) = &self.redis_url
            && !is_url(url)
        {
            return Err(ConfigError::new(
                "HUB_REDIS_URL",
                "must be a redis:// or rediss:// URL",
            ));
        }
        if !self.redis_cluster_urls.is_empty() {
            if self.redis_url.is_some() {
                return Err(ConfigError::new(
                    "HUB_REDIS_CLUSTER_URLS",
                    "cannot be combined with HUB_REDIS_URL (set one of them)",
                ));
            }
            if let Some(bad) = self.redis_cluster_urls.iter().find(|u| !is_url(u)) {
                return Err(ConfigError::new(
                    "HUB_REDIS_CLUSTER_URLS",
                    format!("{bad:?} is not a redis:// or rediss:// URL"),
                ));
            }
        }
        if !self.redis_sentinel_urls.is_empty() {
            if self.redis_url.is_some() || !self.redis_cluster_urls.is_empty() {
                return Err(ConfigError::new(
                    "HUB_REDIS_SENTINEL_URLS",
                    "cannot be combined with HUB_REDIS_URL or HUB_REDIS_CLUSTER_URLS (set one of them)",
                ));
            }
            if let Some(bad) = self
                .redis_sentinel_urls
                .iter()
                .find(|u| !u.starts_with("redis://"))
            {
                return Err(ConfigError::new(
                    "HUB_REDIS_SENTINEL_URLS",
                    format!("{bad:?} is not a redis:// URL (TLS to Sentinels is not supported)"),
                ));
            }
            if self.redis_sentinel_master.is_none() {
                return Err(ConfigError::new(
                    "HUB_REDIS_SENTINEL_MASTER",
                    "required with HUB_REDIS_SENTINEL_URLS (the master's name the Sentinels monitor)",
                ));
            }
        } else {
            for (name, set) in [
                (
                    "HUB_REDIS_SENTINEL_MASTER",
                    self.redis_sentinel_master.is_some(),
                ),
                (
                    "HUB_REDIS_SENTINEL_PASSWORD",
                    self.redis_sentinel_password.is_some(),
                ),
            ] {
                if set {
                    return Err(ConfigError::new(name, "needs HUB_REDIS_SENTINEL_URLS"));
                }
            }
        }
        if self.redis_prefix.is_empty()
            || !self
                .redis_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
        {
            return Err(ConfigError::new(
                "HUB_REDIS_PREFIX",
                "must be non-empty letters, digits, '-', '_', '.' or ':'",
            ));
        }
        within("HUB_REDIS_POOL_SIZE", self.redis_pool_size, 1, 1024)?;
        within(
            "HUB_REDIS_SYNC_REPLICAS",
            self.redis_sync_replicas as usize,
            0,
            16,
        )?;
        if self.presence_timeout < Duration::from_secs(1)
            || self.presence_timeout > Duration::from_secs(30)
        {
            return Err(ConfigError::new(
                "HUB_PRESENCE_TIMEOUT",
                "must be between 1s and 30s",
            ));
        }
        if self.publish_linger > Duration::from_millis(100) {
            return Err(ConfigError::new(
                "HUB_PUBLISH_LINGER",
                "must be at most 100ms",
            ));
        }
        if self.worker_threads > 1024 {
            return Err(ConfigError::new(
                "HUB_WORKER_THREADS",
                "must be at most 1024 (0: one per CPU)",
            ));
        }
        at_least(
            "HUB_REDIS_TIMEOUT",
            self.redis_timeout,
            Duration::from_millis(50),
        )?;
        if let Some(path) = &self.redis_ca_file {
            let tls = self
                .redis_url
                .iter()
                .chain(&self.redis_cluster_urls)
                .any(|u| u.starts_with("rediss://"));
            if !tls {
                return Err(ConfigError::new(
                    "HUB_REDIS_CA_FILE",
                    "needs a rediss:// HUB_REDIS_URL or HUB_REDIS_CLUSTER_URLS",
                ));
            }
            if !path.is_file() {
                return Err(ConfigError::new(
                    "HUB_REDIS_CA_FILE",
                    format!("{} is not a readable file", path.display()),
                ));
            }
        }
        Ok(())
    }

    /// Kafka ingest.
    fn validate_ingest(&self) -> Result<(), ConfigError> {
        self.validate_kafka_security()?;
        within(
            "HUB_INGEST_MAX_RECORD_BYTES",
            self.ingest_max_record_bytes,
            1024,
            16 * 1024 * 1024,
        )?;
        if self.kafka_group.is_empty() {
            return Err(ConfigError::new("HUB_KAFKA_GROUP", "must not be empty"));
        }
        if self.ingest_linger > Duration::from_millis(100) {
            return Err(ConfigError::new(
                "HUB_INGEST_LINGER",
                "must be at most 100ms",
            ));
        }
        if let Some(path) = &self.ingest_routes {
            if self.kafka_brokers.is_none() {
                return Err(ConfigError::new(
                    "HUB_INGEST_ROUTES",
                    "needs HUB_KAFKA_BROKERS (routes only apply to Kafka ingest)",
                ));
            }
            if !path.is_file() {
                return Err(ConfigError::new(
                    "HUB_INGEST_ROUTES",
                    format!("{} is not a readable file", path.display()),
                ));
            }
        }
        if !self.ingest_builtin_routes
            && self.kafka_brokers.is_some()
            && self.ingest_routes.is_none()
        {
            return Err(ConfigError::new(
                "HUB_INGEST_BUILTIN_ROUTES",
                "is false and HUB_INGEST_ROUTES names no file: ingest would have no route",
            ));
        }
        Ok(())
    }

    /// History, queues, caps and rates.
    fn validate_capacity(&self) -> Result<(), ConfigError> {
        within("HUB_HISTORY_SIZE", self.history_size, 1, 100_000)?;
        within("HUB_SEND_QUEUE", self.send_queue, 8, 65_536)?;
        within("HUB_MAX_CONNECTIONS", self.max_connections, 1, 10_000_000)?;
        within(
            "HUB_MAX_CONNECTIONS_PER_USER",
            self.max_connections_per_user,
            1,
            100_000,
        )?;
        within(
            "HUB_MAX_CHANNELS_PER_CONNECTION",
            self.max_channels_per_connection,
            0,
            crate::cursor::MAX_ENTRIES,
        )?;
        within(
            "HUB_MAX_CHANNEL_SUBSCRIBERS",
            self.max_channel_subscribers,
            1,
            10_000_000,
        )?;
        within(
            "HUB_MAX_CONNECTIONS_PER_IP",
            self.max_connections_per_ip,
            1,
            10_000_000,
        )?;
        within(
            "HUB_MAX_PENDING_HANDSHAKES",
            self.max_pending_handshakes,
            1,
            10_000_000,
        )?;
        within(
            "HUB_USER_HANDSHAKES_PER_SECOND",
            self.user_handshakes_per_second as usize,
            1,
            1_000_000,
        )?;
        within(
            "HUB_USER_HANDSHAKE_BURST",
            self.user_handshake_burst as usize,
            1,
            1_000_000,
        )?;
        within(
            "HUB_WS_MESSAGES_PER_SECOND",
            self.ws_messages_per_second as usize,
            1,
            1_000_000,
        )?;
        at_least("HUB_HISTORY_TTL", self.history_ttl, Duration::from_secs(1))?;
        at_least(
            "HUB_IDEMPOTENCY_TTL",
            self.idempotency_ttl,
            Duration::from_secs(1),
        )?;
        within("HUB_DEDUPE_WINDOW", self.dedupe_window, 1, 100_000)?;
        Ok(())
    }

    /// Heartbeats, timeouts and the drain.
    fn validate_timing(&self) -> Result<(), ConfigError> {
        at_least(
            "HUB_PING_INTERVAL",
            self.ping_interval,
            Duration::from_millis(100),
        )?;
        at_least(
            "HUB_PONG_TIMEOUT",
            self.pong_timeout,
            Duration::from_millis(100),
        )?;
        at_least(
            "HUB_HANDSHAKE_TIMEOUT",
            self.handshake_timeout,
            Duration::from_millis(100),
        )?;
        at_least(
            "HUB_WRITE_TIMEOUT",
            self.write_timeout,
            Duration::from_millis(100),
        )?;
        if self.drain_window > self.shutdown_grace {
            return Err(ConfigError::new(
                "HUB_DRAIN_WINDOW",
                "must not be longer than HUB_SHUTDOWN_GRACE",
            ));
        }
        Ok(())
    }
}

impl Settings {
    /// Kafka security settings: no half-configured SASL or TLS, nothing this build's Kafka
    /// client cannot honour (the rules every Kafka client of the workspace shares).
    fn validate_kafka_security(&self) -> Result<(), ConfigError> {
        self.kafka_security()
            .validate("HUB_")
            .map_err(|e| ConfigError::new(&e.setting.variable("HUB_"), e.problem))
    }

    /// The security settings of every Kafka client ingest creates.
    pub fn kafka_security(&self) -> Security {
        Security {
            protocol: self.kafka_security_protocol,
            mechanism: self.kafka_sasl_mechanism,
            username: self.kafka_sasl_username.clone(),
            password: self.kafka_sasl_password.clone(),
            ca_file: self.kafka_ssl_ca_file.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn ingest_without_any_route_is_refused() {
        let err = Settings::load_from_pairs([
            ("HUB_JWT_SECRET", SECRET),
            ("HUB_KAFKA_BROKERS", "127.0.0.1:9092"),
            ("HUB_INGEST_BUILTIN_ROUTES", "false"),
        ])
        .expect_err("no route at all");
        assert_eq!(
            err.to_string(),
            "config: HUB_INGEST_BUILTIN_ROUTES: is false and HUB_INGEST_ROUTES names no file: ingest would have no route"
        );
    }

    #[test]
    fn sentinel_settings_name_the_setting_at_fault() {
        let s = Settings::load_from_pairs([
            ("HUB_JWT_SECRET", SECRET),
            (
                "HUB_REDIS_SENTINEL_URLS",
                "redis://10.0.0.1:26379, redis://10.0.0.2:26379",
            ),
            ("HUB_REDIS_SENTINEL_MASTER", "hub"),
            ("HUB_REDIS_SENTINEL_PASSWORD", "pw"),
        ])
        .expect("valid");
        let Some(crate::backplane::redis::RedisEndpoint::Sentinel {
            sentinels,
            master,
            password,
        }) = s.redis_endpoint()
        else {
            panic!("not a Sentinel endpoint")
        };
        assert_eq!(
            sentinels,
            ["redis://10.0.0.1:26379", "redis://10.0.0.2:26379"]
        );
        assert_eq!((master.as_str(), password.as_deref()), ("hub", Some("pw")));
        let cases: [(&[(&str, &str)], &str); 4] = [
            (
                &[("HUB_REDIS_SENTINEL_URLS", "redis://s:26379")],
                "config: HUB_REDIS_SENTINEL_MASTER: required with HUB_REDIS_SENTINEL_URLS (the master's name the Sentinels monitor)",
            ),
            (
                &[("HUB_REDIS_SENTINEL_MASTER", "hub")],
                "config: HUB_REDIS_SENTINEL_MASTER: needs HUB_REDIS_SENTINEL_URLS",
            ),
            (
                &[
                    ("HUB_REDIS_SENTINEL_URLS", "redis://s:26379"),
                    ("HUB_REDIS_SENTINEL_MASTER", "hub"),
                    ("HUB_REDIS_URL", "redis://r:6379"),
                ],
                "config: HUB_REDIS_SENTINEL_URLS: cannot be combined with HUB_REDIS_URL or HUB_REDIS_CLUSTER_URLS (set one of them)",
            ),
            (
                &[
                    ("HUB_REDIS_SENTINEL_URLS", "rediss://s:26379"),
                    ("HUB_REDIS_SENTINEL_MASTER", "hub"),
                ],
                "config: HUB_REDIS_SENTINEL_URLS: \"rediss://s:26379\" is not a redis:// URL (TLS to Sentinels is not supported)",
            ),
        ];
        for (pairs, line) in cases {
            let mut all = vec![("HUB_JWT_SECRET", SECRET)];
            all.extend_from_slice(pairs);
            let e = Settings::load_from_pairs(all).expect_err(line);
            assert_eq!(e.to_string(), line);
        }
    }

    #[test]
    fn defaults_with_a_secret_are_valid() {
        let s = Settings::load_from_pairs([("HUB_JWT_SECRET", SECRET)]).expect("valid");
        assert_eq!(s.history_size, 100);
        assert_eq!(s.ping_interval, Duration::from_secs(25));
        assert_eq!(s.history_ttl, Duration::from_secs(86_400));
    }

    #[test]
    fn short_secret_is_refused_naming_the_setting() {
        let e = Settings::load_from_pairs([("HUB_JWT_SECRET", "short")]).unwrap_err();
        assert_eq!(e.setting, "HUB_JWT_SECRET");
        assert!(e.to_string().starts_with("config: HUB_JWT_SECRET:"));
    }

    #[test]
    fn numeric_api_key_stays_a_string() {
        let s = Settings::load_from_pairs([
            ("HUB_JWT_SECRET", SECRET),
            ("HUB_API_KEY", "12345678901234567890"),
        ])
        .expect("valid");
        assert_eq!(s.api_key.as_deref(), Some("12345678901234567890"));
    }

    #[test]
    fn bad_duration_names_the_setting() {
        let e = Settings::load_from_pairs([("HUB_PING_INTERVAL", "soon")]).unwrap_err();
        assert_eq!(e.setting, "HUB_PING_INTERVAL");
    }

    #[test]
    fn unknown_setting_is_refused() {
        let e = Settings::load_from_pairs([("HUB_PING_INTERVALL", "5s")]).unwrap_err();
        assert_eq!(e.setting, "HUB_PING_INTERVALL");
        assert!(e.problem.contains("unknown"));
    }

    #[test]
    fn origins_split_on_commas() {
        let s = Settings::load_from_pairs([
            ("HUB_JWT_SECRET", SECRET),
            (
                "HUB_ALLOWED_ORIGINS",
                "https://a.example, http://localhost:3000",
            ),
        ])
        .expect("valid");
        assert_eq!(
            s.allowed_origins,
            vec!["https://a.example", "http://localhost:3000"]
        );
    }

    #[test]
    fn two_key_sources_contradict() {
        let e = Settings::load_from_pairs([
            ("HUB_JWT_SECRET", SECRET),
            ("HUB_JWT_JWKS_URL", "https://issuer.example/jwks.json"),
        ])
        .unwrap_err();
        assert_eq!(e.setting, "HUB_JWT_SECRET");
    }

    #[test]
    fn leeway_over_a_minute_is_refused() {
        let e = Settings::load_from_pairs([("HUB_JWT_LEEWAY", "2m")]).unwrap_err();
        assert_eq!(e.setting, "HUB_JWT_LEEWAY");
    }
}
