//! The executor's rules, kept apart from Kubernetes I/O: whose an object is
//! ([`ownership`]), what a graph may reach and what to write for a node ([`write`]), and how a
//! graph rendered by Pequod is told from a hand-written one ([`proof`], keyed by
//! [`signing_key`]). The ResourceGraph controller drives them.

pub mod ownership;
pub mod progress;
pub mod proof;
pub mod signing_key;
pub mod write;
