use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::json;

use super::*;
use crate::api::{InstancePhase, PlanSummary, RolloutPhase, RolloutPolicy, reasons};
use crate::cue::Module;

fn t(secs: i64) -> jiff::Timestamp {
    jiff::Timestamp::from_second(1_800_000_000 + secs).unwrap()
}

fn key(name: &str) -> InstanceKey {
    InstanceKey {
        namespace: "team".into(),
        name: name.into(),
    }
}

fn member(name: &str, digest: &str, phase: InstancePhase) -> Member {
    Member {
        key: key(name),
        labels: BTreeMap::new(),
        digest: Some(digest.into()),
        phase: Some(phase),
        pinned: false,
    }
}

fn staged(batch: serde_json::Value, budget: i32) -> Policy {
    let spec: RolloutPolicy = serde_json::from_value(json!({
        "strategy": "Staged", "batchSize": batch, "healthTimeoutSeconds": 60, "failureBudget": budget
    }))
    .unwrap();
    Policy::from_spec(Some(&spec)).unwrap()
}

fn admitted(step: &Step) -> Vec<String> {
    match &step.admission {
        Admission::All => vec!["*".into()],
        Admission::Only(keys) => keys.iter().map(|k| k.name.clone()).collect(),
    }
}

use InstancePhase::{Failed, Ready};

#[test]
fn batches_of_one_wait_for_each_instance_to_be_ready() {
    let policy = staged(json!(1), 0);
    let mut memory = Memory::new("new");
    let mut fleet = vec![
        member("a", "old", Ready),
        member("b", "old", Ready),
        member("c", "old", Ready),
    ];
    let first = step(&policy, "new", &fleet, Gate::Open, &mut memory, t(0));
    assert_eq!(
        (first.phase, admitted(&first), first.started_batch),
        (RolloutPhase::Progressing, vec!["a".into()], true)
    );

    // a is admitted but not rendered yet, then on the target but not Ready: b waits.
    let waiting = step(&policy, "new", &fleet, Gate::Open, &mut memory, t(5));
    assert_eq!((admitted(&waiting), waiting.started_batch), (vec!["a".into()], false));
    assert!(waiting.message.contains("0 of 1"), "{}", waiting.message);
    fleet[0] = member("a", "new", InstancePhase::Applying);
    assert_eq!(
        admitted(&step(&policy, "new", &fleet, Gate::Open, &mut memory, t(10))),
        vec!["a"]
    );

    fleet[0] = member("a", "new", Ready);
    let second = step(&policy, "new", &fleet, Gate::Open, &mut memory, t(15));
    assert_eq!(
        (admitted(&second), second.started_batch),
        (vec!["a".into(), "b".into()], true)
    );
    assert_eq!(memory.batch.as_ref().map(|b| b.number), Some(2));

    fleet[1] = member("b", "new", Ready);
    step(&policy, "new", &fleet, Gate::Open, &mut memory, t(20));
    fleet[2] = member("c", "new", Ready);
    let done = step(&policy, "new", &fleet, Gate::Open, &mut memory, t(25));
    assert_eq!(
        (done.phase, done.admission.clone()),
        (RolloutPhase::Complete, Admission::All)
    );
    assert_eq!(
        (done.counts.updated, done.counts.pending, done.counts.failed),
        (3, 0, 0)
    );
}

#[test]
fn a_batch_not_ready_in_time_stops_the_rollout_beyond_the_budget() {
    for (budget, expected) in [(0, RolloutPhase::Blocked), (1, RolloutPhase::Progressing)] {
        let policy = staged(json!(1), budget);
        let mut memory = Memory::new("new");
        let mut fleet = vec![member("a", "old", Ready), member("b", "old", Ready)];
        step(&policy, "new", &fleet, Gate::Open, &mut memory, t(0));
        fleet[0] = member("a", "new", InstancePhase::Applying);
        // Within the timeout it waits; past it, a counts as failed.
        assert_eq!(
            step(&policy, "new", &fleet, Gate::Open, &mut memory, t(59)).phase,
            RolloutPhase::Progressing
        );
        let late = step(&policy, "new", &fleet, Gate::Open, &mut memory, t(61));
        assert_eq!(late.phase, expected, "budget {budget}");
        assert_eq!(late.counts.failed, 1);
        if expected == RolloutPhase::Blocked {
            assert_eq!(late.reason, reasons::HEALTH_GATE_FAILED);
            assert_eq!(admitted(&late), vec!["a"], "b is not reached");
            assert!(late.message.contains("team/a"), "{}", late.message);
            // An instance that recovers opens the gate again.
            fleet[0] = member("a", "new", Ready);
            let recovered = step(&policy, "new", &fleet, Gate::Open, &mut memory, t(70));
            assert_eq!(admitted(&recovered), vec!["a", "b"]);
        } else {
            assert_eq!(admitted(&late), vec!["a", "b"], "within budget the next batch starts");
        }
    }
}

#[test]
fn a_new_instance_is_no_batch_of_its_own() {
    let policy = staged(json!(1), 0);
    let mut fresh = member("new", "x", InstancePhase::Pending);
    fresh.digest = None;
    let fleet = vec![member("a", "v1", Ready), fresh];
    let step = step(&policy, "v1", &fleet, Gate::Open, &mut Memory::new("v1"), t(0));
    assert_eq!((step.phase, step.started_batch), (RolloutPhase::Complete, false));
}

#[test]
fn a_failed_instance_stops_the_rollout_at_once() {
    let policy = staged(json!(1), 0);
    let mut memory = Memory::new("new");
    let mut fleet = vec![member("a", "old", Ready), member("b", "old", Ready)];
    step(&policy, "new", &fleet, Gate::Open, &mut memory, t(0));
    fleet[0] = member("a", "new", Failed);
    let blocked = step(&policy, "new", &fleet, Gate::Open, &mut memory, t(1));
    assert_eq!((blocked.phase, blocked.counts.failed), (RolloutPhase::Blocked, 1));
}

#[test]
fn canaries_go_first_and_percentages_round_up() {
    let mut spec: RolloutPolicy = serde_json::from_value(json!({
        "strategy": "Staged", "batchSize": "50%",
        "canarySelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["canary"]}]}
    }))
    .unwrap();
    let policy = Policy::from_spec(Some(&spec)).unwrap();
    let mut fleet: Vec<Member> = ["a", "b", "c"].iter().map(|n| member(n, "old", Ready)).collect();
    fleet[2].labels.insert("tier".into(), "canary".into());
    let first = step(&policy, "new", &fleet, Gate::Open, &mut Memory::new("new"), t(0));
    assert_eq!(admitted(&first), vec!["a", "c"], "50% of 3 is 2: the canary c, then a");

    spec.batch_size = Some(IntOrString::String("0%".into()));
    assert!(Policy::from_spec(Some(&spec)).is_err());
    spec.batch_size = Some(IntOrString::Int(0));
    assert!(Policy::from_spec(Some(&spec)).is_err());
    spec.batch_size = Some(IntOrString::String("3".into()));
    assert_eq!(Policy::from_spec(Some(&spec)).unwrap().batch, BatchSize::Count(3));
    spec.canary_selector =
        serde_json::from_value(json!({"matchExpressions": [{"key": "x", "operator": "Near"}]})).unwrap();
    assert!(Policy::from_spec(Some(&spec)).unwrap_err().contains("Near"));
}

#[test]
fn approval_and_pause_hold_every_instance() {
    let fleet = vec![member("a", "old", Ready)];
    for policy in [staged(json!(1), 0), Policy::from_spec(None).unwrap()] {
        let gated = step(
            &policy,
            "new",
            &fleet,
            Gate::AwaitingApproval(2),
            &mut Memory::new("new"),
            t(0),
        );
        assert_eq!(
            (gated.phase, gated.reason),
            (RolloutPhase::Blocked, reasons::APPROVAL_REQUIRED)
        );
        assert!(
            gated.message.contains("pequod.io/approve-destructive-change=new"),
            "{}",
            gated.message
        );
        assert_eq!(admitted(&gated), Vec::<String>::new());
        let mut paused = policy.clone();
        paused.paused = true;
        let held = step(&paused, "new", &fleet, Gate::Open, &mut Memory::new("new"), t(0));
        assert_eq!((held.phase, admitted(&held)), (RolloutPhase::Paused, vec![]));
    }
}

#[test]
fn immediate_admits_everyone_and_pinned_instances_are_left_alone() {
    let mut fleet = vec![member("a", "old", Ready), member("b", "old", Ready)];
    fleet[1].pinned = true;
    let policy = Policy::from_spec(None).unwrap();
    let first = step(&policy, "new", &fleet, Gate::Open, &mut Memory::new("new"), t(0));
    assert_eq!(
        (first.phase, first.admission.clone()),
        (RolloutPhase::Progressing, Admission::All)
    );
    assert_eq!((first.counts.pending, first.counts.pinned), (1, 1));
    fleet[0] = member("a", "new", InstancePhase::Applying);
    let done = step(&policy, "new", &fleet, Gate::Open, &mut Memory::new("new"), t(1));
    assert_eq!(
        (done.phase, done.counts.updated, done.counts.total),
        (RolloutPhase::Complete, 1, 2)
    );
}

#[test]
fn a_resumed_rollout_keeps_its_batch_and_timer() {
    let policy = staged(json!(1), 0);
    let fleet = vec![member("a", "new", InstancePhase::Applying), member("b", "old", Ready)];
    let mut memory = Memory::resume("new", &fleet, Some((1, t(0))));
    let resumed = step(&policy, "new", &fleet, Gate::Open, &mut memory, t(30));
    assert_eq!(
        (resumed.phase, admitted(&resumed)),
        (RolloutPhase::Progressing, vec!["a".to_string()])
    );
    assert_eq!(
        step(&policy, "new", &fleet, Gate::Open, &mut memory, t(61)).phase,
        RolloutPhase::Blocked
    );
}

fn module(digest: &str) -> Module {
    Module {
        digest: digest.into(),
        package: "p".into(),
        platform: "p".into(),
        dir: "/".into(),
        has_metadata: false,
        has_status: false,
        has_versions: false,
        has_settings: false,
    }
}

#[test]
fn instances_keep_their_version_until_admitted() {
    let mut selection = Selection::hold(module("new"), Some(module("old")));
    selection.admission = Admission::Only([key("a")].into());
    #[rustfmt::skip]
    let cases = [
        ("a", Some("old"), None, Wanted::Target),
        ("b", Some("old"), None, Wanted::Current),
        ("b", Some("new"), None, Wanted::Target),
        ("b", Some("older"), None, Wanted::Version("older".into())),
        ("b", None, None, Wanted::Current),
        ("a", Some("old"), Some("older"), Wanted::Version("older".into())),
        ("b", Some("old"), Some("new"), Wanted::Target),
    ];
    for (name, recorded, pin, wanted) in cases {
        assert_eq!(
            choose(&selection, &key(name), recorded, pin),
            wanted,
            "{name} {recorded:?} {pin:?}"
        );
    }
    assert_eq!(
        choose(&Selection::hold(module("new"), None), &key("b"), None, None),
        Wanted::Target
    );
}

#[test]
fn only_instances_whose_version_may_change_are_looked_at_again() {
    let old = Selection::hold(module("new"), Some(module("old")));
    let mut new = old.clone();
    assert_eq!(affected(&old, &new), Affected::None);
    new.admission = Admission::Only([key("a")].into());
    assert_eq!(affected(&old, &new), Affected::Some([key("a")].into()));
    new.admission = Admission::All;
    assert_eq!(affected(&old, &new), Affected::All);
    assert_eq!(
        affected(&old, &Selection::hold(module("newer"), Some(module("old")))),
        Affected::All
    );
}

#[test]
fn a_report_announces_transitions_once() {
    let now = Time(t(0));
    let summary = PlanSummary::default();
    let policy = staged(json!(1), 0);
    let fleet = vec![member("a", "old", Ready)];
    let mut memory = Memory::new("new");
    let gated = step(&policy, "new", &fleet, Gate::AwaitingApproval(1), &mut memory, t(0));
    let first = report(&gated, ("new", Some("old")), &memory, &summary, None, (&now, Some(1)));
    assert_eq!(
        first.events.iter().map(|e| (e.0, e.1)).collect::<Vec<_>>(),
        vec![(true, reasons::APPROVAL_REQUIRED)]
    );
    assert_eq!(
        (first.condition.is_true(), first.status.current_digest.as_deref()),
        (false, Some("old"))
    );
    let shown = (first.status.clone(), first.condition.clone());
    let again = report(
        &gated,
        ("new", Some("old")),
        &memory,
        &summary,
        Some(&shown),
        (&Time(t(9)), Some(1)),
    );
    assert!(again.events.is_empty(), "no second announcement");
    assert_eq!(
        again.condition.last_transition_time,
        first.condition.last_transition_time
    );

    let moving = step(&policy, "new", &fleet, Gate::Open, &mut memory, t(10));
    let batch = report(
        &moving,
        ("new", Some("old")),
        &memory,
        &summary,
        Some(&shown),
        (&now, Some(1)),
    );
    assert_eq!(
        batch.events.iter().map(|e| e.1).collect::<Vec<_>>(),
        vec![reasons::BATCH_STARTED]
    );
    assert_eq!(
        (batch.status.batch, batch.status.progress.as_deref()),
        (Some(1), Some("0/1"))
    );
}

#[test]
fn digests_are_shortened_for_messages() {
    assert_eq!(short_digest("sha256:0123456789abcdef"), "sha256:0123456789ab");
    assert_eq!(short_digest("abc"), "abc");
}
