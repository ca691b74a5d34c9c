//! svcproxy: the node Service proxy. The binary's pieces live here so integration tests and benchmarks can
//! drive them; the pure logic lives in the model and backend crates.
#![forbid(unsafe_code)]

pub mod audit;
pub mod backends;
pub mod build_info;
pub mod cleanup;
pub mod cli;
pub mod config_file;
pub mod config_watch;
pub mod debug_http;
pub mod diagnosis;
pub mod diff;
pub mod dir_changes;
pub mod events;
pub mod exec;
pub mod explain;
pub mod families;
pub mod hand_back;
pub mod health;
pub mod http_server;
pub mod implied_run;
pub mod metrics;
pub mod node_addresses;
pub mod oom_score;
pub mod packet_counters;
pub mod process_metrics;
pub mod removal_order;
pub mod served_frontends;
pub mod service_health;
pub mod source;
pub mod status;
pub mod sync;
pub mod upstream_flags;
