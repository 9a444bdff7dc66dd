//! What an instance's status says at each step of its pipeline, and which events go with it:
//! pure transitions of a status draft, checked without a cluster by the table tests below.

use kube::runtime::controller::Action;
use kube::runtime::events::EventType;

use crate::api::condition_types::{POLICY_COMPLIANT, READY, RENDERED};
use crate::api::names::{DELETION_PROTECTION_ANNOTATION, PAUSED_ANNOTATION, RECONCILE_REQUEST_ANNOTATION};
use crate::api::{ConditionStatus, InstancePhase, InstanceStatus, ResourceGraph, Violation, reasons};
use crate::controller::harness::{Error, StatusDraft};
use crate::instance_graph::{graph_progress, node_summaries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// An instance's status under construction.
pub(super) type Draft = StatusDraft<InstanceStatus>;

/// The outputs `declared` (a `#Status` schema) has a field for, of that field's type.
fn declared_outputs(
    outputs: &std::collections::BTreeMap<String, serde_json::Value>,
    declared: Option<&serde_json::Value>,
) -> std::collections::BTreeMap<String, serde_json::Value> {
    use serde_json::Value;
    let Some(fields) = declared.and_then(|d| d.get("properties")).and_then(Value::as_object) else {
        return Default::default();
    };
    outputs
        .iter()
        .filter(|(name, value)| {
            let Some(field) = fields.get(name.as_str()) else {
                return false;
            };
            match field.get("type").and_then(Value::as_str) {
                Some("string") => value.is_string(),
                Some("integer") => value.is_i64() || value.is_u64(),
                Some("number") => value.is_number(),
                Some("boolean") => value.is_boolean(),
                Some("object") => value.is_object(),
                Some("array") => value.is_array(),
                _ => true,
            }
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Why an instance's pipeline stopped before its graph's progress was mirrored.
pub(super) enum InstanceStop {
    /// The status says why; it is written and the instance looked at per the action.
    Settled(Action),
    /// The status says why; it is written and the reconcile fails, to be retried with backoff.
    Retry(Error),
    /// The reconcile failed before the status could say anything.
    Error(Error),
}

impl<E: Into<Error>> From<E> for InstanceStop {
    fn from(e: E) -> Self {
        Self::Error(e.into())
    }
}

/// What an instance's owner asks through its annotations (see docs/user-guide.md).
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Controls {
    /// `pequod.io/paused: "true"`: not reconciled, deletion included.
    pub paused: bool,
    /// `pequod.io/deletion-protection: "true"`: deletion waits.
    pub protected: bool,
    /// `pequod.io/reconcile-requested-at`, when its value was not handled yet.
    pub reconcile_request: Option<String>,
}

impl Controls {
    pub(super) fn of(meta: &ObjectMeta, status: &InstanceStatus) -> Self {
        let annotation = |key: &str| meta.annotations.as_ref().and_then(|a| a.get(key));
        let on = |key: &str| annotation(key).is_some_and(|v| v == "true");
        Self {
            paused: on(PAUSED_ANNOTATION),
            protected: on(DELETION_PROTECTION_ANNOTATION),
            reconcile_request: annotation(RECONCILE_REQUEST_ANNOTATION)
                .filter(|v| !v.is_empty() && status.last_handled_reconcile_at.as_ref() != Some(*v))
                .cloned(),
        }
    }
}

impl StatusDraft<InstanceStatus> {
    pub(super) fn pause(&mut self) {
        self.paused(format!(
            "{PAUSED_ANNOTATION} is \"true\": the instance is not rendered or applied, deletion included"
        ));
    }

    /// An instance reconciled again after a pause says so.
    pub(super) fn resume(&mut self) {
        self.resumed("the instance is reconciled");
    }

    /// Deletion was asked for, but the instance is protected: nothing is torn down.
    pub(super) fn deletion_protected(&mut self) {
        let message = format!(
            "deletion waits: {DELETION_PROTECTION_ANNOTATION} is \"true\"; remove the annotation to let the instance and its objects go"
        );
        self.condition_with_event(
            READY,
            false,
            reasons::DELETION_PROTECTED,
            message,
            (EventType::Warning, reasons::DELETION_PROTECTED),
        );
        self.new.phase = Some(InstancePhase::Deleting);
    }

    /// A requested reconcile was carried out.
    pub(super) fn reconcile_handled(&mut self, request: &str) {
        self.new.last_handled_reconcile_at = Some(request.to_string());
    }

    /// Marks the instance Failed with `Ready=False` and `reason`, with an event on transition.
    pub(super) fn fail(&mut self, reason: &str, message: String) {
        self.condition_with_event(READY, false, reason, message, (EventType::Warning, reason));
        self.new.phase = Some(InstancePhase::Failed);
    }

    pub(super) fn rendered(&mut self, count: usize, digest: &str) {
        let message = format!("{count} object(s) rendered by module {digest}");
        self.condition(RENDERED, true, reasons::RENDERED, message);
    }

    /// Records a render whose graph the graph rules refused: cue rendered it, so `Rendered`
    /// is True, and `Ready` says what the check refused, naming the node (the last accepted
    /// graph stays). Waits for a change of the instance or the module.
    pub(super) fn graph_refused(&mut self, digest: &str, reason: &str, message: String) -> InstanceStop {
        let rendered = format!("rendered by module {digest}; the graph rules refused the result");
        self.condition(RENDERED, true, reasons::RENDERED, rendered);
        let ready = format!("the rendered graph was refused; the last accepted graph stays: {message}");
        self.condition_with_event(
            READY,
            false,
            reason,
            ready,
            (EventType::Warning, reasons::GRAPH_REJECTED),
        );
        self.new.phase = Some(InstancePhase::Failed);
        InstanceStop::Settled(Action::requeue(super::RESYNC))
    }

    /// Records a render that could not run (cue missing or timed out): retried with backoff,
    /// Ready left as it was.
    pub(super) fn cue_unavailable(&mut self, error: crate::cue::RenderError) -> InstanceStop {
        use crate::error::ErrorCategory;
        self.new.phase = Some(InstancePhase::Rendering);
        self.condition(RENDERED, false, error.reason(), error.to_string());
        InstanceStop::Retry(Error::CueUnavailable(error))
    }

    /// Records a failed render and why the pipeline stops: it waits for a change of the
    /// instance or the module (`resync`), and the last accepted graph stays.
    pub(super) fn render_failed(&mut self, reason: &str, message: String, resync: Action) -> InstanceStop {
        self.condition_with_event(
            RENDERED,
            false,
            reason,
            message.clone(),
            (EventType::Warning, reasons::CUE_RENDER_FAILED),
        );
        let ready = format!("rendering failed; the last accepted graph stays: {message}");
        self.condition(READY, false, reason, ready);
        self.new.phase = Some(InstancePhase::Failed);
        InstanceStop::Settled(resync)
    }

    /// Records the policy findings (the first `kept` in the status); returns whether any of
    /// severity Error blocks the change.
    pub(super) fn policies(&mut self, violations: &[Violation], kept: usize) -> bool {
        use crate::api::Severity;
        self.new.violations = violations.iter().take(kept).cloned().collect();
        let described = |vs: &[&Violation]| {
            vs.iter()
                .map(|v| format!("{}: {}", v.path, v.message))
                .collect::<Vec<_>>()
                .join("; ")
        };
        let errors: Vec<&Violation> = violations.iter().filter(|v| v.severity == Severity::Error).collect();
        if !errors.is_empty() {
            let message = format!(
                "{} policy violation(s) block the change; the last accepted graph stays: {}",
                errors.len(),
                described(&errors)
            );
            if self.old.violations != self.new.violations {
                self.event(EventType::Warning, reasons::POLICY_VIOLATION, &message);
            }
            self.condition(POLICY_COMPLIANT, false, reasons::POLICY_VIOLATION, message.clone());
            self.condition(READY, false, reasons::POLICY_VIOLATION, message);
            self.new.phase = Some(InstancePhase::Failed);
            return true;
        }
        if violations.is_empty() {
            self.condition(POLICY_COMPLIANT, true, reasons::COMPLIANT, "no policy findings");
        } else {
            let all: Vec<&Violation> = violations.iter().collect();
            self.condition(POLICY_COMPLIANT, true, reasons::WARNINGS, described(&all));
        }
        false
    }

    /// Mirrors the graph's progress on the instance; returns whether the instance is Ready.
    /// `declared` is the module's `#Status` schema: only its fields, with their types, are
    /// shown, since the apiserver would drop the others (and a status that differs from what
    /// it keeps would be written again and again) or refuse the whole status for a wrong type.
    pub(super) fn mirror_progress(&mut self, rg: &ResourceGraph, declared: Option<&serde_json::Value>) -> bool {
        self.new.nodes = node_summaries(rg);
        // The module's own fields, as the graph resolved them from the live objects.
        self.new.outputs = rg
            .status
            .as_ref()
            .map(|s| declared_outputs(&s.outputs, declared))
            .unwrap_or_default();
        let (phase, ready, reason, message) = graph_progress(rg);
        // Becoming Ready is news after a failure; a first Ready is said by the condition alone.
        if ready && self.old.phase == Some(InstancePhase::Failed) {
            self.event(EventType::Normal, reasons::READY, &message);
        }
        if phase == InstancePhase::Failed && !self.was(READY, ConditionStatus::False, &reason) {
            self.event(EventType::Warning, &reason, &message);
        }
        self.condition(READY, ready, &reason, message);
        self.new.phase = Some(phase);
        ready
    }

    /// Deletion waits for the graph's teardown, whose progress it shows.
    pub(super) fn deleting(&mut self, waiting: String, rg: &ResourceGraph) {
        self.condition(READY, false, reasons::DELETING, waiting);
        self.new.phase = Some(InstancePhase::Deleting);
        self.new.nodes = node_summaries(rg);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Severity;
    use crate::api::condition_types::PAUSED;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use serde_json::json;

    fn draft(status: &InstanceStatus) -> Draft {
        StatusDraft::for_test(status, 3)
    }

    fn condition<'a>(status: &'a InstanceStatus, type_: &str) -> (bool, &'a str) {
        let c = status
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .unwrap_or_else(|| panic!("no {type_} condition in {status:?}"));
        (c.status == ConditionStatus::True, c.reason.as_str())
    }

    fn events(d: &Draft) -> Vec<String> {
        d.event_reasons()
    }

    /// A graph of one ConfigMap: `phase` and its Ready condition, or no status of this spec.
    fn graph(phase: Option<&str>, ready: (&str, &str)) -> ResourceGraph {
        let status = phase.map(|p| {
            json!({"observedGeneration": 1, "phase": p,
                   "conditions": [{"type": "Ready", "status": ready.0, "reason": ready.1, "message": "m",
                                   "lastTransitionTime": "2026-11-30T00:00:00Z"}]})
        });
        serde_json::from_value(json!({
            "apiVersion": "platform.platform.example.com/v1alpha1", "kind": "ResourceGraph",
            "metadata": {"name": "g", "namespace": "team-a", "generation": 1},
            "spec": {"nodes": [{"id": "cm", "object": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}}}]},
            "status": status,
        }))
        .unwrap()
    }

    fn violation(severity: Severity) -> Violation {
        Violation {
            path: "spec.replicas".into(),
            message: "at most 10".into(),
            severity,
        }
    }

    /// An instance whose graph is Ready.
    fn ready() -> InstanceStatus {
        let mut d = draft(&InstanceStatus::default());
        d.rendered(1, "sha256:1");
        d.policies(&[], 20);
        d.mirror_progress(&graph(Some("Completed"), ("True", "AllNodesReady")), None);
        d.new
    }

    #[test]
    fn the_graph_s_progress_becomes_the_instance_s_with_events_on_transitions() {
        #[rustfmt::skip]
        let cases = [
            ("no status for this spec yet", graph(None, ("", "")), InstancePhase::Applying, false, reasons::APPLYING, vec![]),
            ("applying", graph(Some("Executing"), ("False", "Progressing")), InstancePhase::Applying, false, "Progressing", vec![]),
            // A first Ready is said by the condition alone.
            ("ready", graph(Some("Completed"), ("True", "AllNodesReady")), InstancePhase::Ready, true, reasons::READY, vec![]),
            ("failed", graph(Some("Failed"), ("False", "NodeFailed")), InstancePhase::Failed, false, "NodeFailed", vec!["NodeFailed"]),
            ("failed without a reason", graph(Some("Failed"), ("False", "")), InstancePhase::Failed, false, "", vec![""]),
        ];
        for (case, rg, phase, is_ready, reason, expected_events) in cases {
            let mut d = draft(&InstanceStatus::default());
            assert_eq!(d.mirror_progress(&rg, None), is_ready, "{case}");
            assert_eq!(d.new.phase, Some(phase), "{case}");
            assert_eq!(condition(&d.new, READY), (is_ready, reason), "{case}");
            assert_eq!(events(&d), expected_events, "{case}");
            assert_eq!(d.new.nodes.len(), 1, "{case}");
            // The same progress again tells nothing new.
            let mut again = draft(&d.new);
            again.mirror_progress(&rg, None);
            assert!(again.events.is_empty(), "{case}: {:?}", events(&again));
        }
        // Ready again after a failure is news.
        let failed = graph(Some("Failed"), ("False", "NodeFailed"));
        let mut d = draft(&InstanceStatus::default());
        d.mirror_progress(&failed, None);
        let mut recovered = draft(&d.new);
        assert!(recovered.mirror_progress(&graph(Some("Completed"), ("True", "AllNodesReady")), None));
        assert_eq!(events(&recovered), [reasons::READY]);
    }

    #[test]
    fn render_failures_keep_the_last_graph_and_are_told_once() {
        let mut d = draft(&ready());
        let stop = d.render_failed(
            "CueRenderFailed",
            "spec.port: conflicting values".into(),
            Action::await_change(),
        );
        assert!(matches!(stop, InstanceStop::Settled(_)));
        assert_eq!(condition(&d.new, RENDERED), (false, "CueRenderFailed"));
        assert_eq!(condition(&d.new, READY), (false, "CueRenderFailed"));
        assert_eq!(d.new.phase, Some(InstancePhase::Failed));
        assert_eq!(events(&d), [reasons::CUE_RENDER_FAILED]);
        let mut again = draft(&d.new);
        let _ = again.render_failed(
            "CueRenderFailed",
            "spec.port: conflicting values".into(),
            Action::await_change(),
        );
        assert!(again.events.is_empty());

        // A memory limit or a timeout: the same shape, with its own reason.
        let mut d = draft(&ready());
        let _ = d.render_failed(
            "CueMemoryLimit",
            "needs more than 160 MiB".into(),
            Action::await_change(),
        );
        assert_eq!(condition(&d.new, RENDERED), (false, "CueMemoryLimit"));

        // cue unavailable: retried, Ready left as it was, no event.
        let mut d = draft(&ready());
        let stop = d.cue_unavailable(crate::cue::RenderError::CueUnavailable {
            message: "cannot run cue".into(),
        });
        assert!(matches!(stop, InstanceStop::Retry(_)));
        assert_eq!(condition(&d.new, RENDERED), (false, "CueBinaryUnavailable"));
        assert_eq!(condition(&d.new, READY), (true, reasons::READY));
        assert_eq!(d.new.phase, Some(InstancePhase::Rendering));
        assert!(d.events.is_empty());

        // Rendering again after a failure.
        let mut d = draft(&ready());
        let _ = d.render_failed("CueRenderFailed", "x".into(), Action::await_change());
        let mut fixed = draft(&d.new);
        fixed.rendered(2, "sha256:2");
        assert_eq!(condition(&fixed.new, RENDERED), (true, reasons::RENDERED));
    }

    #[test]
    fn policies_block_on_errors_and_report_the_rest() {
        #[rustfmt::skip]
        let cases = [
            ("none", vec![], false, true, reasons::COMPLIANT),
            ("a warning", vec![violation(Severity::Warning)], false, true, reasons::WARNINGS),
            ("information", vec![violation(Severity::Info)], false, true, reasons::WARNINGS),
            ("an error", vec![violation(Severity::Error), violation(Severity::Warning)], true, false, reasons::POLICY_VIOLATION),
        ];
        for (case, violations, blocks, compliant, reason) in cases {
            let mut d = draft(&ready());
            assert_eq!(d.policies(&violations, 20), blocks, "{case}");
            assert_eq!(condition(&d.new, POLICY_COMPLIANT), (compliant, reason), "{case}");
            assert_eq!(d.new.violations, violations, "{case}");
            if blocks {
                assert_eq!(condition(&d.new, READY), (false, reasons::POLICY_VIOLATION));
                assert_eq!(d.new.phase, Some(InstancePhase::Failed));
                assert_eq!(events(&d), [reasons::POLICY_VIOLATION]);
                let mut again = draft(&d.new);
                again.policies(&violations, 20);
                assert!(again.events.is_empty(), "{case}: the same findings are told once");
            } else {
                assert!(d.events.is_empty(), "{case}");
            }
        }
        let many: Vec<Violation> = (0..30).map(|_| violation(Severity::Warning)).collect();
        let mut d = draft(&ready());
        d.policies(&many, 20);
        assert_eq!(d.new.violations.len(), 20, "the status keeps a bounded number");
    }

    fn meta(annotations: &[(&str, &str)]) -> ObjectMeta {
        ObjectMeta {
            annotations: Some(
                annotations
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn controls_come_from_annotations_and_a_handled_request_is_not_repeated() {
        let none = Controls::of(&meta(&[]), &InstanceStatus::default());
        assert_eq!(none, Controls::default());
        let all = Controls::of(
            &meta(&[
                (PAUSED_ANNOTATION, "true"),
                (DELETION_PROTECTION_ANNOTATION, "true"),
                (RECONCILE_REQUEST_ANNOTATION, "2026-11-30T18:00:00Z"),
            ]),
            &InstanceStatus::default(),
        );
        assert!(all.paused && all.protected);
        assert_eq!(all.reconcile_request.as_deref(), Some("2026-11-30T18:00:00Z"));
        let handled = InstanceStatus {
            last_handled_reconcile_at: Some("2026-11-30T18:00:00Z".into()),
            ..Default::default()
        };
        let again = Controls::of(
            &meta(&[(RECONCILE_REQUEST_ANNOTATION, "2026-11-30T18:00:00Z")]),
            &handled,
        );
        assert_eq!(again.reconcile_request, None);
        let off = Controls::of(
            &meta(&[(PAUSED_ANNOTATION, "false"), (DELETION_PROTECTION_ANNOTATION, "yes")]),
            &handled,
        );
        assert!(!off.paused && !off.protected, "only \"true\" counts");
    }

    #[test]
    fn pausing_protection_and_requests_are_said_once() {
        let mut d = draft(&ready());
        d.pause();
        assert_eq!(condition(&d.new, PAUSED), (true, reasons::PAUSED));
        assert_eq!(
            condition(&d.new, READY),
            (true, reasons::READY),
            "Ready stays as it was"
        );
        assert_eq!(events(&d), [reasons::PAUSED]);
        let mut again = draft(&d.new);
        again.pause();
        assert!(again.events.is_empty());
        let mut resumed = draft(&again.new);
        resumed.resume();
        assert_eq!(condition(&resumed.new, PAUSED), (false, reasons::RESUMED));

        let mut d = draft(&ready());
        d.deletion_protected();
        assert_eq!(condition(&d.new, READY), (false, reasons::DELETION_PROTECTED));
        assert_eq!(d.new.phase, Some(InstancePhase::Deleting));
        assert_eq!(events(&d), [reasons::DELETION_PROTECTED]);
        let mut again = draft(&d.new);
        again.deletion_protected();
        assert!(again.events.is_empty());

        let mut d = draft(&ready());
        d.reconcile_handled("now");
        assert_eq!(d.new.last_handled_reconcile_at.as_deref(), Some("now"));
    }

    #[test]
    fn conflicts_and_refusals_fail_once_and_deletion_shows_the_teardown() {
        for reason in [reasons::GRAPH_CONFLICT, reasons::GRAPH_REJECTED] {
            let mut d = draft(&ready());
            d.fail(reason, "why".into());
            assert_eq!(condition(&d.new, READY), (false, reason));
            assert_eq!(d.new.phase, Some(InstancePhase::Failed));
            assert_eq!(events(&d), [reason]);
            let mut again = draft(&d.new);
            again.fail(reason, "why".into());
            assert!(again.events.is_empty());
        }
        let mut d = draft(&ready());
        d.deleting(
            "waiting for wave 1".into(),
            &graph(Some("Executing"), ("False", "Deleting")),
        );
        assert_eq!(condition(&d.new, READY), (false, reasons::DELETING));
        assert_eq!(d.new.phase, Some(InstancePhase::Deleting));
        assert!(d.events.is_empty());
    }

    #[test]
    fn only_declared_outputs_of_their_declared_type_are_shown() {
        let mut rg = graph(Some("Completed"), ("True", "AllNodesReady"));
        rg.status.as_mut().unwrap().outputs = [
            ("url", json!("http://x")),
            ("readyReplicas", json!(2)),
            ("availableReplicas", json!("two")),
            ("undeclared", json!(1)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let declared = json!({"type": "object", "properties": {
            "url": {"type": "string"}, "readyReplicas": {"type": "integer"}, "availableReplicas": {"type": "integer"}}});
        let mut d = draft(&InstanceStatus::default());
        d.mirror_progress(&rg, Some(&declared));
        let shown: Vec<&str> = d.new.outputs.keys().map(String::as_str).collect();
        assert_eq!(
            shown,
            ["readyReplicas", "url"],
            "a wrong type and an undeclared field are left out"
        );
        let mut none = draft(&InstanceStatus::default());
        none.mirror_progress(&rg, None);
        assert!(none.new.outputs.is_empty(), "a module without #Status shows none");
    }
}
