//! Typed settings of the four services, from `<SERVICE>_*` environment variables and an
//! optional TOML file, validated at start. Nothing else in the crate reads the environment.
//!
//! Every service reads the same [`Settings`] type under its own prefix (`ORDER_`, `PAYMENT_`,
//! `DELIVERY_`, `MODERATION_`); a setting that belongs to another service is refused, so a
//! misplaced variable is reported instead of silently ignored.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Serialized};
use serde::{Deserialize, Serialize};
use service_kit::settings;
pub use service_kit::{ConfigError, LogFormat};

pub use kafka_runtime::{SaslMechanism, Security, SecurityProtocol};

/// Which service a process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// REST orders; consumes payment and delivery events.
    Order,
    /// Consumes `order.created`, debits balances.
    Payment,
    /// Consumes `payment.completed`, advances deliveries.
    Delivery,
    /// REST reports; workers decide moderation tasks.
    Moderation,
}

impl Service {
    /// Name used in logs, consumer groups and the processed-events table.
    pub fn name(self) -> &'static str {
        match self {
            Service::Order => "order-service",
            Service::Payment => "payment-service",
            Service::Delivery => "delivery-service",
            Service::Moderation => "moderation-service",
        }
    }

    /// Environment prefix of the service's settings.
    pub fn prefix(self) -> &'static str {
        match self {
            Service::Order => "ORDER_",
            Service::Payment => "PAYMENT_",
            Service::Delivery => "DELIVERY_",
            Service::Moderation => "MODERATION_",
        }
    }

    fn default_addr(self) -> SocketAddr {
        let port = match self {
            Service::Order => 8081,
            Service::Moderation => 8083,
            Service::Payment => 8084,
            Service::Delivery => 8085,
        };
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// The `aud` a token must carry for this service's API (when `JWT_AUDIENCE` is unset).
    fn default_audience(self) -> &'static str {
        match self {
            Service::Order => "orders",
            Service::Moderation => "moderation",
            Service::Payment => "payment",
            Service::Delivery => "delivery",
        }
    }

    /// Settings that only this service reads (beyond the common ones).
    fn own_keys(self) -> &'static [&'static str] {
        match self {
            Service::Order => &[
                "jwt_secret",
                "jwt_audience",
                "hub_audience",
                "allowed_origins",
                "orders_per_minute",
                "orders_burst",
            ],
            Service::Payment => &["opening_balance_cents", "unfunded_users"],
            Service::Delivery => &["step_interval"],
            Service::Moderation => &[
                "jwt_secret",
                "jwt_audience",
                "allowed_origins",
                "reports_per_minute",
                "reports_burst",
                "blocked_words",
                "worker_id",
                "demo_ads",
            ],
        }
    }
}

/// Every setting; which ones a service accepts is checked by [`Settings::load`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// PostgreSQL URL of the service's own database.
    #[serde(default, deserialize_with = "settings::opt_text")]
    pub database_url: Option<String>,
    /// Database connections per process.
    pub database_pool_size: u32,
    /// Kafka bootstrap servers.
    #[serde(default, deserialize_with = "settings::opt_text")]
    pub kafka_brokers: Option<String>,
    /// Consumer group (default: the service name).
    #[serde(default, deserialize_with = "settings::opt_text")]
    pub kafka_group: Option<String>,
    /// How long the relay's producer keeps trying one event before the relay rolls back and
    /// retries the batch later.
    #[serde(with = "humantime_serde")]
    pub kafka_timeout: Duration,
    /// Prepended to every topic name (e.g. `staging.`); the hub's routes must name the same.
    #[serde(default, deserialize_with = "settings::text")]
    pub topic_prefix: String,
    /// Kafka security protocol of every producer and consumer.
    pub kafka_security_protocol: SecurityProtocol,
    /// SASL mechanism (with a `sasl_*` protocol; `PLAIN` when unset).
    pub kafka_sasl_mechanism: Option<SaslMechanism>,
    /// SASL user name (with a `sasl_*` protocol).
    #[serde(default, deserialize_with = "settings::opt_text")]
    pub kafka_sasl_username: Option<String>,
    /// SASL password (with a `sasl_*` protocol). Never logged.
    #[serde(default, deserialize_with = "settings::opt_text")]
    pub kafka_sasl_password: Option<String>,
    /// PEM CA bundle that signs the brokers' certificates (with `ssl` or `sasl_ssl`).
    #[serde(default, deserialize_with = "settings::opt_text")]
    pub kafka_ssl_ca_file: Option<String>,
    /// HTTP listener (API where there is one, plus health, readiness and metrics).
    pub addr: Option<SocketAddr>,
    /// A client must send its whole request head within this time, or is disconnected.
    #[serde(with = "humantime_serde")]
    pub http_header_timeout: Duration,
    /// A request body must arrive within this time (else 408).
    #[serde(with = "humantime_serde")]
    pub http_body_timeout: Duration,
    /// A request must be answered within this time (else 408).
    #[serde(with = "humantime_serde")]
    pub http_request_timeout: Duration,
    /// Run the outbox relay in this process (turn off to run it in another instance only).
    pub outbox_relay: bool,
    /// Outbox rows published per relay transaction.
    pub outbox_batch: u32,
    /// The relay polls this often even without a notification from PostgreSQL.
    #[serde(with = "humantime_serde")]
    pub outbox_poll: Duration,
    /// HS256 secret shared with the hub (order and moderation services).
    #[serde(default, deserialize_with = "settings::opt_text")]
    pub jwt_secret: Option<String>,
    /// The `aud` a token must carry (default: `orders` / `moderation`).
    #[serde(default, deserialize_with = "settings::opt_text")]
    pub jwt_audience: Option<String>,
    /// The `aud` of the hub tokens the order service issues for an order's channel: the hub's
    /// `HUB_JWT_AUDIENCE` (none by default, for a hub that checks none).
    #[serde(default, deserialize_with = "settings::opt_text")]
    pub hub_audience: Option<String>,
    /// Orders one user may place per minute, sustained (order service).
    pub orders_per_minute: u32,
    /// Orders one user may place at once before the per-minute pace applies (order service).
    pub orders_burst: u32,
    /// Reports one reporter may file per minute, sustained (moderation service).
    pub reports_per_minute: u32,
    /// Reports one reporter may file at once before the per-minute pace applies (moderation).
    pub reports_burst: u32,
    /// Seed the catalogue with the demo's ads (`ad-1`..`ad-5` of alice, bob and broke).
    pub demo_ads: bool,
    /// Browser origins allowed to call the REST API (CORS), comma-separated.
    #[serde(default, deserialize_with = "settings::text_list")]
    pub allowed_origins: Vec<String>,
    /// Opening balance of a user's account (payment service).
    pub opening_balance_cents: i64,
    /// Users whose account opens empty (payment service), comma-separated.
    #[serde(default, deserialize_with = "settings::text_list")]
    pub unfunded_users: Vec<String>,
    /// Time between delivery steps (delivery service).
    #[serde(with = "humantime_serde")]
    pub step_interval: Duration,
    /// A report whose reason contains one of these words removes its target (moderation).
    #[serde(default, deserialize_with = "settings::text_list")]
    pub blocked_words: Vec<String>,
    /// Name of this moderation worker in decisions (default: `<host pid>-<random>`).
    #[serde(default, deserialize_with = "settings::opt_text")]
    pub worker_id: Option<String>,
    /// Tracing filter.
    #[serde(default, deserialize_with = "settings::text")]
    pub log: String,
    /// `text` (people) or `json` (one object per line, for a log pipeline).
    pub log_format: LogFormat,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            database_url: None,
            database_pool_size: 10,
            kafka_brokers: None,
            kafka_group: None,
            kafka_timeout: Duration::from_secs(10),
            topic_prefix: String::new(),
            kafka_security_protocol: SecurityProtocol::Plaintext,
            kafka_sasl_mechanism: None,
            kafka_sasl_username: None,
            kafka_sasl_password: None,
            kafka_ssl_ca_file: None,
            addr: None,
            http_header_timeout: Duration::from_secs(10),
            http_body_timeout: Duration::from_secs(10),
            http_request_timeout: Duration::from_secs(30),
            outbox_relay: true,
            outbox_batch: 200,
            outbox_poll: Duration::from_millis(500),
            jwt_secret: None,
            jwt_audience: None,
            hub_audience: None,
            orders_per_minute: 30,
            orders_burst: 10,
            reports_per_minute: 10,
            reports_burst: 5,
            demo_ads: false,
            allowed_origins: Vec::new(),
            opening_balance_cents: 10_000_000,
            unfunded_users: vec!["broke".to_owned()],
            step_interval: Duration::from_secs(3),
            blocked_words: ["scam", "spam", "fraud", "counterfeit", "phishing"]
                .map(str::to_owned)
                .to_vec(),
            worker_id: None,
            log: "info".to_owned(),
            log_format: LogFormat::Text,
        }
    }
}

/// Keys every service reads.
const COMMON_KEYS: &[&str] = &[
    "database_url",
    "database_pool_size",
    "kafka_brokers",
    "kafka_group",
    "kafka_timeout",
    "topic_prefix",
    "kafka_security_protocol",
    "kafka_sasl_mechanism",
    "kafka_sasl_username",
    "kafka_sasl_password",
    "kafka_ssl_ca_file",
    "addr",
    "http_header_timeout",
    "http_body_timeout",
    "http_request_timeout",
    "outbox_relay",
    "outbox_batch",
    "outbox_poll",
    "log",
    "log_format",
];

/// Environment variables with the prefix that are not settings.
const NOT_SETTINGS: &[&str] = &["CONFIG"];

impl Settings {
    /// Defaults, then the TOML file (if any), then `<PREFIX>*` environment variables.
    pub fn load(service: Service, file: Option<&Path>) -> Result<Self, ConfigError> {
        let given = settings::with_file(Figment::new(), file)?;
        let env = Env::prefixed(service.prefix()).ignore(NOT_SETTINGS);
        Self::extract(service, given.merge(env))
    }

    /// Loads from explicit pairs (names with or without the prefix) instead of the environment.
    pub fn load_from_pairs<'a>(
        service: Service,
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, ConfigError> {
        Self::extract(
            service,
            settings::with_pairs(Figment::new(), service.prefix(), pairs),
        )
    }

    /// `given` holds what the file and the environment set, without the defaults.
    fn extract(service: Service, given: Figment) -> Result<Self, ConfigError> {
        let err = |key: &str, problem: String| ConfigError::for_key(service.prefix(), key, problem);
        // Settings of another service are refused rather than silently ignored.
        for key in Settings::all_keys() {
            let own = COMMON_KEYS.contains(&key) || service.own_keys().contains(&key);
            if !own && given.contains(key) {
                return Err(err(key, format!("not a setting of the {}", service.name())));
            }
        }
        let settings: Settings = Figment::from(Serialized::defaults(Settings::default()))
            .merge(given)
            .extract()
            .map_err(|e| ConfigError::from_figment(service.prefix(), &e))?;
        settings
            .validate(service)
            .map_err(|(key, problem)| err(key, problem))?;
        Ok(settings)
    }

    fn all_keys() -> impl Iterator<Item = &'static str> {
        [
            Service::Order,
            Service::Payment,
            Service::Delivery,
            Service::Moderation,
        ]
        .into_iter()
        .flat_map(|s| s.own_keys().iter().copied())
    }

    fn validate(&self, service: Service) -> Result<(), (&'static str, String)> {
        let missing = |key| (key, "missing (required)".to_owned());
        let url = self
            .database_url
            .as_deref()
            .ok_or_else(|| missing("database_url"))?;
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(("database_url", "must start with postgres://".to_owned()));
        }
        if self.kafka_brokers.is_none() {
            return Err(missing("kafka_brokers"));
        }
        if self.database_pool_size == 0 {
            return Err(("database_pool_size", "must be at least 1".to_owned()));
        }
        if self.outbox_batch == 0 {
            return Err(("outbox_batch", "must be at least 1".to_owned()));
        }
        if self.kafka_timeout < Duration::from_millis(100) {
            return Err(("kafka_timeout", "must be at least 100ms".to_owned()));
        }
        if self.outbox_poll.is_zero() {
            return Err(("outbox_poll", "must be above zero".to_owned()));
        }
        if service.own_keys().contains(&"jwt_secret") {
            let secret = self
                .jwt_secret
                .as_deref()
                .ok_or_else(|| missing("jwt_secret"))?;
            if secret.len() < 32 {
                return Err(("jwt_secret", "must be at least 32 bytes".to_owned()));
            }
        }
        for (key, aud) in [
            ("jwt_audience", &self.jwt_audience),
            ("hub_audience", &self.hub_audience),
        ] {
            if aud.as_ref().is_some_and(|a| a.len() > 256) {
                return Err((key, "at most 256 bytes".to_owned()));
            }
        }
        for (key, value) in [
            ("orders_per_minute", self.orders_per_minute),
            ("orders_burst", self.orders_burst),
            ("reports_per_minute", self.reports_per_minute),
            ("reports_burst", self.reports_burst),
        ] {
            if value == 0 {
                return Err((key, "must be at least 1".to_owned()));
            }
        }
        for (key, value) in [
            ("http_header_timeout", self.http_header_timeout),
            ("http_body_timeout", self.http_body_timeout),
            ("http_request_timeout", self.http_request_timeout),
        ] {
            if value < Duration::from_millis(100) {
                return Err((key, "must be at least 100ms".to_owned()));
            }
        }
        self.validate_kafka_security(service)?;
        if self.opening_balance_cents < 0 {
            return Err(("opening_balance_cents", "must not be negative".to_owned()));
        }
        if self.step_interval < Duration::from_millis(10) {
            return Err(("step_interval", "must be at least 10ms".to_owned()));
        }
        if service == Service::Moderation && self.blocked_words.is_empty() {
            return Err(("blocked_words", "must name at least one word".to_owned()));
        }
        for origin in &self.allowed_origins {
            if !(origin.starts_with("http://") || origin.starts_with("https://")) {
                return Err((
                    "allowed_origins",
                    format!("{origin:?} is not an origin like http://host:port"),
                ));
            }
        }
        Ok(())
    }

    /// Kafka security settings that contradict each other, or that this build cannot honour
    /// (the rules every Kafka client of the workspace shares).
    fn validate_kafka_security(&self, service: Service) -> Result<(), (&'static str, String)> {
        self.kafka_security()
            .validate(service.prefix())
            .map_err(|e| (e.setting.key(), e.problem))
    }

    /// The security settings of every producer and consumer.
    pub fn kafka_security(&self) -> Security {
        Security {
            protocol: self.kafka_security_protocol,
            mechanism: self.kafka_sasl_mechanism,
            username: self.kafka_sasl_username.clone(),
            password: self.kafka_sasl_password.clone(),
            ca_file: self.kafka_ssl_ca_file.as_ref().map(PathBuf::from),
        }
    }

    /// The `aud` this service's tokens must carry.
    pub fn jwt_audience(&self, service: Service) -> String {
        self.jwt_audience
            .clone()
            .unwrap_or_else(|| service.default_audience().to_owned())
    }

    /// The HTTP listener address (the service's default port when unset).
    pub fn addr(&self, service: Service) -> SocketAddr {
        self.addr.unwrap_or_else(|| service.default_addr())
    }

    /// The consumer group (the service's name when unset).
    pub fn group(&self, service: Service) -> String {
        self.kafka_group
            .clone()
            .unwrap_or_else(|| service.name().to_owned())
    }

    /// A topic's name with the configured prefix.
    pub fn topic(&self, name: &str) -> String {
        format!("{}{name}", self.topic_prefix)
    }

    /// The database URL (validated present).
    pub fn database_url(&self) -> &str {
        self.database_url.as_deref().unwrap_or_default()
    }

    /// The Kafka bootstrap servers (validated present).
    pub fn kafka_brokers(&self) -> &str {
        self.kafka_brokers.as_deref().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn load(service: Service, pairs: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let mut all = vec![
            ("DATABASE_URL", "postgres://u:p@127.0.0.1/db"),
            ("KAFKA_BROKERS", "127.0.0.1:9092"),
        ];
        all.extend_from_slice(pairs);
        Settings::load_from_pairs(service, all)
    }

    #[test]
    fn defaults_are_valid_for_services_without_an_api() {
        let s = load(Service::Payment, &[]).expect("valid");
        assert_eq!(s.opening_balance_cents, 10_000_000);
        assert_eq!(s.unfunded_users, vec!["broke"]);
        assert_eq!(s.group(Service::Payment), "payment-service");
        assert_eq!(s.addr(Service::Payment).port(), 8084);
    }

    #[test]
    fn the_api_services_need_a_long_secret() {
        let e = load(Service::Order, &[]).expect_err("no secret");
        assert_eq!(
            e.to_string(),
            "config: ORDER_JWT_SECRET: missing (required)"
        );
        let e = load(Service::Moderation, &[("JWT_SECRET", "short")]).expect_err("short");
        assert_eq!(
            e.to_string(),
            "config: MODERATION_JWT_SECRET: must be at least 32 bytes"
        );
        load(Service::Order, &[("JWT_SECRET", SECRET)]).expect("valid");
    }

    #[test]
    fn another_services_setting_is_refused_by_name() {
        let e = load(Service::Payment, &[("STEP_INTERVAL", "1s")]).expect_err("misplaced");
        assert_eq!(
            e.to_string(),
            "config: PAYMENT_STEP_INTERVAL: not a setting of the payment-service"
        );
    }

    #[test]
    fn the_hub_audience_of_channel_tokens_is_the_order_services() {
        let s = load(
            Service::Order,
            &[("JWT_SECRET", SECRET), ("HUB_AUDIENCE", "hub")],
        )
        .expect("valid");
        assert_eq!(s.hub_audience.as_deref(), Some("hub"));
        let s = load(Service::Order, &[("JWT_SECRET", SECRET)]).expect("valid");
        assert_eq!(s.hub_audience, None, "none unless the hub checks one");
        let long = "a".repeat(257);
        let e = load(
            Service::Order,
            &[("JWT_SECRET", SECRET), ("HUB_AUDIENCE", &long)],
        )
        .expect_err("too long");
        assert_eq!(
            e.to_string(),
            "config: ORDER_HUB_AUDIENCE: at most 256 bytes"
        );
        let e = load(
            Service::Moderation,
            &[("JWT_SECRET", SECRET), ("HUB_AUDIENCE", "hub")],
        )
        .expect_err("misplaced");
        assert_eq!(
            e.to_string(),
            "config: MODERATION_HUB_AUDIENCE: not a setting of the moderation-service"
        );
    }

    #[test]
    fn unknown_and_malformed_settings_name_the_variable() {
        let e = load(Service::Delivery, &[("STEP_INTREVAL", "1s")]).expect_err("typo");
        assert_eq!(
            e.to_string(),
            "config: DELIVERY_STEP_INTREVAL: unknown setting"
        );
        let e = load(
            Service::Order,
            &[("JWT_SECRET", SECRET), ("OUTBOX_BATCH", "0")],
        )
        .expect_err("zero");
        assert_eq!(
            e.to_string(),
            "config: ORDER_OUTBOX_BATCH: must be at least 1"
        );
        let e = load(Service::Delivery, &[("STEP_INTERVAL", "soon")]).expect_err("bad");
        assert!(
            e.to_string()
                .starts_with("config: DELIVERY_STEP_INTERVAL: "),
            "{e}"
        );
        let e = load(Service::Payment, &[("DATABASE_URL", "mysql://x")]).expect_err("bad url");
        assert_eq!(
            e.to_string(),
            "config: PAYMENT_DATABASE_URL: must start with postgres://"
        );
    }

    #[test]
    fn lists_come_comma_separated_and_numbers_stay_text() {
        let s = load(
            Service::Moderation,
            &[
                ("JWT_SECRET", "12345678901234567890123456789012345"),
                ("BLOCKED_WORDS", "alpha, beta ,,gamma"),
                ("ALLOWED_ORIGINS", "http://127.0.0.1:8080"),
            ],
        )
        .expect("valid");
        assert_eq!(s.blocked_words, vec!["alpha", "beta", "gamma"]);
        assert_eq!(
            s.jwt_secret.as_deref(),
            Some("12345678901234567890123456789012345")
        );
        assert_eq!(s.topic("moderation.tasks"), "moderation.tasks");
    }

    #[test]
    fn contradictory_kafka_security_settings_name_the_setting() {
        let cases: [(&[(&str, &str)], &str); 5] = [
            (
                &[("KAFKA_SASL_MECHANISM", "PLAIN")],
                "config: PAYMENT_KAFKA_SASL_MECHANISM: needs PAYMENT_KAFKA_SECURITY_PROTOCOL sasl_plaintext or sasl_ssl (it is plaintext)",
            ),
            (
                &[("KAFKA_SECURITY_PROTOCOL", "sasl_plaintext")],
                "config: PAYMENT_KAFKA_SASL_USERNAME: missing (required with sasl_plaintext)",
            ),
            (
                &[
                    ("KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT"),
                    ("KAFKA_SASL_USERNAME", "services"),
                ],
                "config: PAYMENT_KAFKA_SASL_PASSWORD: missing (required with PAYMENT_KAFKA_SASL_USERNAME)",
            ),
            (
                &[("KAFKA_SSL_CA_FILE", "/etc/hostname")],
                "config: PAYMENT_KAFKA_SSL_CA_FILE: needs PAYMENT_KAFKA_SECURITY_PROTOCOL ssl or sasl_ssl (it is plaintext)",
            ),
            (
                &[("KAFKA_SECURITY_PROTOCOL", "tls")],
                "config: PAYMENT_KAFKA_SECURITY_PROTOCOL: must be plaintext, ssl, sasl_plaintext or sasl_ssl",
            ),
        ];
        for (pairs, line) in cases {
            let e = load(Service::Payment, pairs).expect_err(line);
            assert!(e.to_string().starts_with(line), "{e}");
        }
        let s = load(
            Service::Payment,
            &[
                ("KAFKA_SECURITY_PROTOCOL", "sasl_plaintext"),
                ("KAFKA_SASL_USERNAME", "services"),
                ("KAFKA_SASL_PASSWORD", "services-secret"),
            ],
        )
        .expect("valid");
        assert_eq!(s.kafka_security().sasl_mechanism(), SaslMechanism::Plain);
        let config = crate::kafka::client_config(&s);
        assert_eq!(config.get("security.protocol"), Some("sasl_plaintext"));
        assert_eq!(config.get("sasl.mechanism"), Some("PLAIN"));
        assert_eq!(config.get("sasl.username"), Some("services"));
    }

    #[test]
    fn each_api_has_its_own_audience() {
        let s = load(Service::Order, &[("JWT_SECRET", SECRET)]).expect("valid");
        assert_eq!(s.jwt_audience(Service::Order), "orders");
        let s = load(Service::Moderation, &[("JWT_SECRET", SECRET)]).expect("valid");
        assert_eq!(s.jwt_audience(Service::Moderation), "moderation");
        let s = load(
            Service::Order,
            &[("JWT_SECRET", SECRET), ("JWT_AUDIENCE", "shop")],
        )
        .expect("valid");
        assert_eq!(s.jwt_audience(Service::Order), "shop");
        let e = load(Service::Payment, &[("JWT_AUDIENCE", "x")]).expect_err("misplaced");
        assert_eq!(
            e.to_string(),
            "config: PAYMENT_JWT_AUDIENCE: not a setting of the payment-service"
        );
    }
}
