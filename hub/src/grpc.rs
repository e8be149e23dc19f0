//! The gRPC publish API (`notifications.hub.v1.Publisher`, served by tonic when
//! `HUB_GRPC_ADDR` is set): `Publish`, `PublishBatch` and the bidirectional `PublishStream`,
//! with the HTTP API's rules and limits, the API key in the `authorization` metadata.
//!
//! A stream is published in batches of what has arrived (up to 1 000 requests), each batch in
//! one backplane round trip, and answered in request order; so a backend that streams gets the
//! batch price without building batches itself.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::{FutureExt, Stream, StreamExt};
use proto::hub::v1::{PublishBatchRequest, PublishBatchResponse, PublishRequest, PublishResponse};
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use crate::api::{MAX_BATCH_BODY, MAX_BATCH_ITEMS, MAX_BODY};
use crate::backplane::{Backplane, BackplaneError, Publish, Published};
use crate::metrics::Metrics;

/// The generated service stubs (server and client).
pub mod pb {
    tonic::include_proto!("notifications.hub.v1");
}

pub use pb::publisher_client::PublisherClient;
pub use pb::publisher_server::PublisherServer;

/// Largest message the server decodes: a full batch plus framing.
pub const MAX_MESSAGE: usize = MAX_BATCH_BODY + 64 * 1024;

/// The `Publisher` service; cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
}

struct Inner {
    backplane: Arc<dyn Backplane>,
    metrics: Metrics,
    api_key: Option<String>,
}

impl Publisher {
    /// A service publishing into `backplane`; `api_key` `None` refuses every call.
    pub fn new(backplane: Arc<dyn Backplane>, metrics: Metrics, api_key: Option<String>) -> Self {
        Publisher {
            inner: Arc::new(Inner {
                backplane,
                metrics,
                api_key,
            }),
        }
    }

    /// The tonic server for this service, with the message size limit.
    pub fn server(self) -> PublisherServer<Self> {
        PublisherServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let authorization = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        crate::api::check_api_key(self.inner.api_key.as_deref(), authorization)
            .map_err(Status::unauthenticated)
    }

    async fn publish_all(&self, msgs: Vec<Publish>) -> Result<Vec<Published>, Status> {
        let published = self
            .inner
            .backplane
            .publish_batch(msgs)
            .await
            .map_err(|e| match e {
                BackplaneError::Rejected(why) => {
                    Status::invalid_argument(format!("refused: {why}"))
                }
                BackplaneError::Unavailable(_) => {
                    tracing::warn!(error = %e, "gRPC publish failed");
                    Status::unavailable("backplane unavailable, retry")
                }
            })?;
        let duplicates = published.iter().filter(|p| p.duplicate).count() as u64;
        self.inner.metrics.publish_duplicates().inc_by(duplicates);
        self.inner
            .metrics
            .published_api()
            .inc_by(published.len() as u64 - duplicates);
        Ok(published)
    }
}

/// One request → a notification to publish, checked as the HTTP API checks it; `index`
/// names the item of a batch or stream in the error.
fn to_publish(req: PublishRequest, index: Option<usize>) -> Result<Publish, Status> {
    let at = |why: String| match index {
        Some(i) => format!("notifications[{i}]: {why}"),
        None => why,
    };
    if req.data.len() > MAX_BODY {
        return Err(Status::resource_exhausted(at(
            "data larger than 64 KiB".to_owned()
        )));
    }
    let text = String::from_utf8(req.data)
        .map_err(|_| Status::invalid_argument(at("data is not UTF-8 JSON".to_owned())))?;
    let data = RawValue::from_string(text)
        .map_err(|e| Status::invalid_argument(at(format!("data is not JSON: {e}"))))?;
    let key = (!req.idempotency_key.is_empty()).then_some(req.idempotency_key);
    let user = (!req.user_id.is_empty()).then_some(req.user_id);
    let channel = (!req.channel.is_empty()).then_some(req.channel);
    crate::api::publish_from_parts(user, channel, req.r#type, data, key)
        .map_err(|why| Status::invalid_argument(at(why)))
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<PublishResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::publisher_server::Publisher for Publisher {
    async fn publish(
        &self,
        request: Request<PublishRequest>,
    ) -> Result<Response<PublishResponse>, Status> {
        self.authorize(&request)?;
        let msg = to_publish(request.into_inner(), None)?;
        let mut published = self.publish_all(vec![msg]).await?;
        let id = published
            .pop()
            .ok_or_else(|| Status::unavailable("the backplane answered nothing"))?
            .id
            .to_string();
        Ok(Response::new(PublishResponse { id }))
    }

    async fn publish_batch(
        &self,
        request: Request<PublishBatchRequest>,
    ) -> Result<Response<PublishBatchResponse>, Status> {
        self.authorize(&request)?;
        let items = request.into_inner().notifications;
        if items.len() > MAX_BATCH_ITEMS {
            return Err(Status::resource_exhausted(format!(
                "{} notifications, at most {MAX_BATCH_ITEMS} per batch",
                items.len()
            )));
        }
        if items.is_empty() {
            return Err(Status::invalid_argument("notifications must not be empty"));
        }
        let msgs = items
            .into_iter()
            .enumerate()
            .map(|(i, item)| to_publish(item, Some(i)))
            .collect::<Result<Vec<_>, _>>()?;
        let published = self.publish_all(msgs).await?;
        Ok(Response::new(PublishBatchResponse {
            ids: published.iter().map(|p| p.id.to_string()).collect(),
        }))
    }

    type PublishStreamStream = ResponseStream;

    async fn publish_stream(
        &self,
        request: Request<Streaming<PublishRequest>>,
    ) -> Result<Response<Self::PublishStreamStream>, Status> {
        self.authorize(&request)?;
        let mut inbound = request.into_inner();
        // Bounded: a client that does not read its answers stops being read from.
        let (tx, rx) = mpsc::channel::<Result<PublishResponse, Status>>(MAX_BATCH_ITEMS);
        let this = self.clone();
        tokio::spawn(async move {
            let mut index = 0usize;
            let mut ended = false;
            while !ended {
                let mut batch = Vec::new();
                let mut failure = None;
                match inbound.next().await {
                    None => break,
                    Some(Err(e)) => failure = Some(e),
                    Some(Ok(first)) => batch.push(first),
                }
                // Everything that has already arrived joins this batch.
                while failure.is_none() && batch.len() < MAX_BATCH_ITEMS {
                    match inbound.next().now_or_never() {
                        Some(Some(Ok(m))) => batch.push(m),
                        Some(Some(Err(e))) => failure = Some(e),
                        Some(None) => {
                            ended = true;
                            break;
                        }
                        None => break,
                    }
                }
                // The valid requests before an invalid one are published and answered; the
                // invalid one ends the stream with its reason (and index).
                let mut msgs = Vec::with_capacity(batch.len());
                let mut invalid = None;
                for req in batch {
                    match to_publish(req, Some(index)) {
                        Ok(m) => msgs.push(m),
                        Err(status) => {
                            invalid = Some(status);
                            break;
                        }
                    }
                    index += 1;
                }
                if !msgs.is_empty() {
                    match this.publish_all(msgs).await {
                        Ok(published) => {
                            for p in published {
                                let answer = PublishResponse {
                                    id: p.id.to_string(),
                                };
                                if tx.send(Ok(answer)).await.is_err() {
                                    return;
                                }
                            }
                        }
                        Err(status) => {
                            let _ = tx.send(Err(status)).await;
                            return;
                        }
                    }
                }
                if let Some(status) = invalid.or(failure) {
                    let _ = tx.send(Err(status)).await;
                    return;
                }
            }
        });
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
