//! Integration tests: the real server on loopback, called through tonic
//! clients, on SQLite and on PostgreSQL. One binary keeps linking cheap.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

mod audit_api;
mod auth_mode_api;
mod bulk;
mod caller_access;
mod cli;
mod dashboard;
mod faults;
mod fuzz_corpus;
mod gateway_envoy;
mod gateway_nginx;
mod health_and_reflection;
mod invitations;
mod leaflock;
mod leaflock_features;
mod metrics_api;
mod monitoring;
mod postgres_schema;
mod reconcile;
mod storage_conformance;
mod tracing_api;
mod users_api;
mod verify_clerk;
mod verify_legacy;
mod webhooks;
