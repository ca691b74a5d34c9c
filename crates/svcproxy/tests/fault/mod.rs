//! The fault cases, grouped by the kind of fault, and what they share.

pub mod harness;
pub mod manifests;
pub mod report;
pub mod second_writer;
pub mod web;
pub mod write_failures;

mod api_outage;
mod backends;
mod crash;
mod drift;
mod leftovers;
mod restore_failures;
