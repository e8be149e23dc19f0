//! Integration tests: real hub nodes on random ports, real WebSocket and SSE clients.

mod admission;
mod auth;
mod backplane;
mod channels;
mod cli;
mod cluster;
mod drain;
mod edge;
mod expiry;
mod grpc;
mod heartbeat;
mod helpers;
mod ingest;
mod isolation;
mod limits;
mod metrics;
mod origin;
mod presence;
mod redis_cluster;
mod replicated;
mod resume;
mod sentinel;
mod slow_consumer;
mod tls;
