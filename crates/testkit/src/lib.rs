//! Shared harness for svcproxy's end-to-end tests.
//!
//! Two halves: a network-namespace [`Lab`] that simulates a node with pods
//! and an outside host on the real kernel (so tests see what netfilter really
//! does), and a [`FakeApiServer`] that serves the Kubernetes list/watch
//! protocol from an in-memory store tests change while a client runs.

#![forbid(unsafe_code)]

mod backend;
mod client;
pub mod fake_apiserver;
pub mod fixtures;
mod http_get;
mod lab;
mod netns;
mod require_root;
pub mod scale;
mod wait;

pub use backend::{Backend, BackendError};
pub use client::{ClientError, DEFAULT_TIMEOUT, Reply, spread, tcp_request, udp_request};
pub use fake_apiserver::FakeApiServer;
pub use http_get::{HttpGetError, http_get};
pub use lab::{Lab, LabError, Pod};
pub use netns::{NetNs, NetNsError};
pub use require_root::require_root;
pub use wait::wait_until;
