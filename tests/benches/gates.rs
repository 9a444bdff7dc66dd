//! What a pass of the executor spends on module-defined readiness and status, side by side:
//! a built-in `FieldMatch` gate against a CEL `Expression` gate on the same live Deployment,
//! compiling an expression the first time, and resolving the WebService's status references.
//! None of it starts a process. `cargo bench --bench gates` runs it.

use std::time::{Duration, Instant};

use pequod::api::ReadyGate;
use pequod::graph::reference;
use pequod::readiness::{GateState, Registry};
use serde_json::json;

const ROUNDS: u32 = 20_000;

fn per_call(rounds: u32, mut f: impl FnMut()) -> Duration {
    let started = Instant::now();
    for _ in 0..rounds {
        f();
    }
    started.elapsed() / rounds
}

fn main() {
    let deployment = json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "my-app", "generation": 2},
        "spec": {"replicas": 3},
        "status": {"observedGeneration": 2, "replicas": 3, "readyReplicas": 3, "availableReplicas": 3, "updatedReplicas": 3,
                   "conditions": [{"type": "Progressing", "status": "True"}, {"type": "Available", "status": "True"}]},
    });
    let gate = |v: serde_json::Value| -> ReadyGate { serde_json::from_value(v).unwrap() };
    let field_match = gate(json!({"type": "FieldMatch", "path": "status.readyReplicas", "value": 3}));
    let expression = gate(json!({"type": "Expression",
        "expression": "self.status.readyReplicas >= self.spec.replicas && self.status.conditions.exists(c, c.type == 'Available' && c.status == 'True')"}));
    let registry = Registry::default();
    assert_eq!(
        registry.evaluate(std::slice::from_ref(&expression), Some(&deployment)),
        GateState::Ready
    );

    let builtin = per_call(ROUNDS, || {
        std::hint::black_box(registry.evaluate(std::slice::from_ref(&field_match), Some(&deployment)));
    });
    let cel = per_call(ROUNDS, || {
        std::hint::black_box(registry.evaluate(std::slice::from_ref(&expression), Some(&deployment)));
    });
    let mut i = 0u32;
    let compile = per_call(2_000, || {
        i += 1;
        std::hint::black_box(pequod::readiness::check_expression(&format!("self.spec.replicas >= {i}")).is_ok());
    });

    let template = json!({
        "url": "http://my-app.team-a.svc.cluster.local:80",
        "readyReplicas": "${deployment.status.readyReplicas}",
        "availableReplicas": "${deployment.status.availableReplicas}",
    });
    let live = |node: &str| (node == "deployment").then_some(&deployment);
    let projection = per_call(ROUNDS, || {
        std::hint::black_box(reference::resolve(&template, &live).unwrap());
    });

    println!("gate benchmark ({ROUNDS} rounds each, one live Deployment)");
    println!("  FieldMatch gate (built-in)            {builtin:>10.2?}");
    println!(
        "  Expression gate (CEL, compiled once)  {cel:>10.2?}   ({:.1}x the built-in gate)",
        cel.as_secs_f64() / builtin.as_secs_f64()
    );
    println!("  compiling a new expression            {compile:>10.2?}");
    println!("  WebService status projection          {projection:>10.2?}   (3 fields, 2 references)");
}
