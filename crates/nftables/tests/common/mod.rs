//! Shared test helpers: compact builders for model objects, the reference scenarios, and a network namespace
//! with a real `nft` for the tests that go through the kernel.
#![allow(dead_code)]

pub mod arbitrary;
pub mod flow;
pub mod netns;
#[allow(unused_imports)]
pub use svcproxy_testkit::fixtures::scenario;

pub use svcproxy_testkit::fixtures::*;
