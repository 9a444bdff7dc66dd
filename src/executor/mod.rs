//! The executor's rules, kept apart from Kubernetes I/O: the objects a graph applies and how
//! they compare with live ones ([`object`]), whose an object is ([`ownership`]), what a graph
//! may reach and what to write for a node ([`write`]), node states and the graph's status
//! ([`progress`]), and how a graph rendered by Pequod is told from a hand-written one
//! ([`proof`], keyed by `runtime::signing_key`). The ResourceGraph controller drives them.

pub mod object;
pub mod ownership;
pub mod progress;
pub mod proof;
pub mod write;
