//! The whole flow for one test: its databases and topics, the four services and a hub.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::json;
use test_support::cluster::KafkaCluster;
use test_support::hex;
use test_support::kafka::brokers;

use crate::helpers::databases::TestDb;
use crate::helpers::http::post;
use crate::helpers::hub::Hub;
use crate::helpers::kafka::Topics;
use crate::helpers::output_dir;
use crate::helpers::processes::{Kind, ServiceProcess};
use crate::helpers::tokens::token_for;

/// Every part of the saga for one test: databases, topics, the four services, a hub.
pub struct Stack {
    pub topics: Topics,
    pub secret: String,
    pub dbs: BTreeMap<&'static str, TestDb>,
    pub services: BTreeMap<&'static str, ServiceProcess>,
    pub hub: Option<Hub>,
    /// Extra settings per service, applied at every (re)start.
    pub extra: BTreeMap<&'static str, Vec<(String, String)>>,
    pub out: PathBuf,
}

impl Stack {
    /// Databases and topics; no process yet.
    pub async fn prepare(name: &str) -> Stack {
        Stack::prepare_on(name, &brokers()).await
    }

    /// The same on the Kafka at `brokers`.
    pub async fn prepare_on(name: &str, brokers: &str) -> Stack {
        Stack::prepare_with(name, Topics::create(brokers).await).await
    }

    /// The same on the three-broker cluster, every topic replicated three times.
    pub async fn prepare_replicated(name: &str, cluster: &KafkaCluster) -> Stack {
        Stack::prepare_with(name, Topics::create_replicated(cluster).await).await
    }

    async fn prepare_with(name: &str, topics: Topics) -> Stack {
        let mut dbs = BTreeMap::new();
        for kind in [Kind::Order, Kind::Payment, Kind::Delivery, Kind::Moderation] {
            dbs.insert(kind.name(), TestDb::create(kind.name()).await);
        }
        Stack {
            topics,
            secret: hex(24),
            dbs,
            services: BTreeMap::new(),
            hub: None,
            extra: BTreeMap::new(),
            out: output_dir(name),
        }
    }

    /// Everything: the four services and a hub ingesting the test's topics.
    pub async fn start(name: &str) -> Stack {
        let mut stack = Stack::prepare(name).await;
        stack.start_hub().await;
        for kind in [Kind::Order, Kind::Payment, Kind::Delivery, Kind::Moderation] {
            stack.start_service(kind);
        }
        stack
    }

    /// The settings a service gets.
    pub fn env(&self, kind: Kind) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = vec![
            ("DATABASE_URL".into(), self.dbs[kind.name()].url.clone()),
            ("DATABASE_POOL_SIZE".into(), "4".into()),
            ("KAFKA_BROKERS".into(), self.topics.brokers.clone()),
            (
                "KAFKA_GROUP".into(),
                format!("{}{}", self.topics.prefix, kind.name()),
            ),
            ("TOPIC_PREFIX".into(), self.topics.prefix.clone()),
            ("ADDR".into(), "127.0.0.1:0".into()),
            ("LOG".into(), "info".into()),
        ];
        match kind {
            Kind::Order | Kind::Moderation => {
                env.push(("JWT_SECRET".into(), self.secret.clone()));
                // Tests that are not about rate limits are never limited.
                let (rate, burst) = match kind {
                    Kind::Order => ("ORDERS_PER_MINUTE", "ORDERS_BURST"),
                    _ => ("REPORTS_PER_MINUTE", "REPORTS_BURST"),
                };
                env.push((rate.into(), "100000".into()));
                env.push((burst.into(), "100000".into()));
                if let Some(hub) = &self.hub {
                    env.push(("ALLOWED_ORIGINS".into(), hub.base()));
                }
            }
            Kind::Delivery => env.push(("STEP_INTERVAL".into(), "150ms".into())),
            Kind::Payment => {}
        }
        if let Some(extra) = self.extra.get(kind.name()) {
            env.extend(extra.iter().cloned());
        }
        env
    }

    pub fn start_service(&mut self, kind: Kind) -> &ServiceProcess {
        let log = self.out.join(format!("{}.log", kind.name()));
        let process = ServiceProcess::start(kind, &self.env(kind), &log);
        self.services.insert(kind.name(), process);
        &self.services[kind.name()]
    }

    pub fn service(&self, kind: Kind) -> &ServiceProcess {
        &self.services[kind.name()]
    }

    pub fn take_service(&mut self, kind: Kind) -> ServiceProcess {
        self.services.remove(kind.name()).expect("service running")
    }

    pub fn db(&self, kind: Kind) -> TestDb {
        self.dbs[kind.name()].clone()
    }

    pub async fn start_hub(&mut self) {
        self.hub = Some(Hub::start(&self.secret, &self.topics, false).await);
    }

    pub async fn start_dev_hub(&mut self) {
        self.hub = Some(Hub::start(&self.secret, &self.topics, true).await);
    }

    pub fn hub(&self) -> &Hub {
        self.hub.as_ref().expect("hub started")
    }

    /// A token of `user` for the API of `kind` (with its audience).
    pub fn token(&self, kind: Kind, user: &str) -> String {
        token_for(&self.secret, user, Some(kind.audience()))
    }

    /// Publishes an ad of `owner` in the moderation service's catalogue; returns its id.
    pub async fn post_ad(&self, owner: &str, title: &str) -> String {
        let (status, body) = post(
            &self.service(Kind::Moderation).url("/ads"),
            Some(&self.token(Kind::Moderation, owner)),
            &json!({"title": title}),
        )
        .await;
        assert_eq!(status, 201, "POST /ads: {body}");
        assert_eq!(body["owner_id"], owner);
        body["ad_id"].as_str().expect("ad_id").to_owned()
    }

    /// POST /orders as `user`; returns the order id.
    pub async fn place_order(&self, user: &str, price_cents: i64) -> String {
        let (status, body) = post(
            &self.service(Kind::Order).url("/orders"),
            Some(&self.token(Kind::Order, user)),
            &json!({
                "items": [{"product_id": "p1", "quantity": 2, "price_cents": price_cents}],
                "delivery_address": "1 Test Street",
            }),
        )
        .await;
        assert_eq!(status, 201, "POST /orders: {body}");
        assert_eq!(body["status"], "CREATED");
        body["order_id"].as_str().expect("order_id").to_owned()
    }

    /// Stops everything and removes the test's databases and topics.
    pub async fn cleanup(mut self) {
        self.services.clear();
        if let Some(hub) = self.hub.take() {
            hub.stop().await;
        }
        for (_, db) in std::mem::take(&mut self.dbs) {
            db.drop_db().await;
        }
        self.topics.delete().await;
    }
}

/// The happy path's statuses.
pub const DELIVERED_PATH: [&str; 5] = [
    "CREATED",
    "PAID",
    "IN_TRANSIT",
    "OUT_FOR_DELIVERY",
    "DELIVERED",
];
