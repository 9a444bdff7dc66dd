//! What a Transform's status says at each step of its pipeline, and which events go with it:
//! pure transitions of a status draft, so that every condition and reason can be checked
//! without a cluster (the table tests below). The pipeline in `mod.rs` calls them with what
//! its kube and cue calls found.

use kube::runtime::controller::Action;
use kube::runtime::events::EventType;

use crate::api::condition_types::{
    AUTHORIZED, CRD_GENERATED, CUE_FETCHED, RBAC_CONFIGURED, READY, SCHEMA_COMPATIBLE, SCHEMA_EXTRACTED,
};
use crate::api::{GeneratedCrd, ResolvedCueRef, TransformPhase, TransformStatus, reasons};
use crate::controller::harness::{Error, StatusDraft};
use crate::executor::proof::Allowance;

/// A Transform's status under construction.
pub(super) type Draft = StatusDraft<TransformStatus>;

/// Why a Transform's pipeline stopped before serving its kind. Not one type with
/// `InstanceStop`: a Transform fails at a named stage with its own condition and event, an
/// instance only settles or retries, so a shared enum would give each variants it never uses.
pub(super) enum TransformStop {
    /// A stage failed: the Transform is Failed with condition `stage` False and `reason`, one
    /// `event` Warning on the transition, and is looked at again per `then`.
    Failed {
        stage: &'static str,
        reason: &'static str,
        message: String,
        event: &'static str,
        then: Action,
    },
    /// The status says what is awaited; it is written and the Transform looked at per the action.
    Waiting(Action),
    /// The reconcile itself failed (see [`crate::controller::harness::error_policy`]).
    Error(Error),
}

impl<E: Into<Error>> From<E> for TransformStop {
    fn from(e: E) -> Self {
        Self::Error(e.into())
    }
}

impl TransformStop {
    /// A schema change refused because it would break stored instances.
    pub(super) fn breaking(message: String, then: Action) -> Self {
        Self::failed(
            SCHEMA_COMPATIBLE,
            reasons::BREAKING_CHANGE,
            message,
            reasons::BREAKING_CHANGE,
            then,
        )
    }

    pub(super) fn failed(
        stage: &'static str,
        reason: &'static str,
        message: String,
        event: &'static str,
        then: Action,
    ) -> Self {
        Self::Failed {
            stage,
            reason,
            message,
            event,
            then,
        }
    }
}

impl StatusDraft<TransformStatus> {
    /// The status a pipeline's result leaves, and what happens next.
    pub(super) fn conclude(&mut self, result: Result<Action, TransformStop>) -> Result<Action, Error> {
        match result {
            Ok(action) => Ok(action),
            Err(TransformStop::Failed {
                stage,
                reason,
                message,
                event,
                then,
            }) => {
                self.fail(stage, reason, &message, event);
                Ok(then)
            }
            Err(TransformStop::Waiting(then)) => Ok(then),
            Err(TransformStop::Error(e)) => Err(e),
        }
    }

    /// Marks the Transform Failed at `stage` (a condition type), with an event on transition.
    pub(super) fn fail(&mut self, stage: &str, reason: &str, message: &str, event_reason: &str) {
        self.condition_with_event(stage, false, reason, message, (EventType::Warning, event_reason));
        self.condition(READY, false, reason, message);
        self.new.phase = Some(TransformPhase::Failed);
    }

    pub(super) fn pause(&mut self, message: &str) {
        self.paused(message);
        if self.new.phase.is_none() {
            self.new.phase = Some(TransformPhase::Pending);
        }
    }

    /// A Transform reconciled again after a pause says so.
    pub(super) fn resume(&mut self) {
        self.resumed("the Transform is reconciled");
    }

    pub(super) fn authorized(&mut self, allowance: Allowance, namespace: &str) {
        let message = match allowance {
            Allowance::Restricted => format!(
                "namespace {namespace} is not trusted: instances get ordinary namespaced objects in their own namespace"
            ),
            Allowance::Namespace => {
                "trusted: instances get the kinds the module renders, in their namespace".to_string()
            }
            Allowance::Cluster => {
                "trusted: instances get the kinds the module renders, cluster-scoped objects included".to_string()
            }
        };
        let reason = if allowance == Allowance::Restricted {
            reasons::RESTRICTED
        } else {
            reasons::TRUSTED
        };
        self.condition(AUTHORIZED, true, reason, message);
    }

    pub(super) fn fetched(&mut self, what: String) {
        self.condition(CUE_FETCHED, true, reasons::FETCHED, what);
    }

    /// The remote failed and a cached resolution stands in: served, but said.
    pub(super) fn fetched_stale(&mut self, why: &str) {
        self.condition_with_event(
            CUE_FETCHED,
            false,
            reasons::CUE_FETCH_FAILED,
            why,
            (EventType::Warning, reasons::CUE_FETCH_FAILED),
        );
    }

    pub(super) fn extracted(&mut self) {
        self.condition(
            SCHEMA_EXTRACTED,
            true,
            reasons::EXTRACTED,
            "#Input converted to a CRD schema",
        );
    }

    /// The CRD was found compatible and, when `changed`, written.
    pub(super) fn crd_written(&mut self, crd_name: &str, changed: bool) {
        self.condition(
            SCHEMA_COMPATIBLE,
            true,
            reasons::COMPATIBLE,
            "no breaking schema change",
        );
        if changed {
            let verb = if self.old.generated_crd.is_some() {
                "updated"
            } else {
                "created"
            };
            self.event(
                EventType::Normal,
                reasons::CRD_GENERATED,
                &format!("CRD {crd_name} {verb}"),
            );
        }
    }

    pub(super) fn established(&mut self, crd_name: &str) {
        let message = format!("CRD {crd_name} is Established");
        self.condition(CRD_GENERATED, true, reasons::ESTABLISHED, message);
    }

    pub(super) fn waiting_for_established(&mut self, crd_name: &str) {
        let message = format!("waiting for CRD {crd_name} to be Established");
        self.condition(CRD_GENERATED, false, reasons::WAITING_FOR_ESTABLISHED, message);
        self.new.phase = Some(TransformPhase::Generating);
    }

    pub(super) fn rbac_configured(&mut self, message: String) {
        self.condition(RBAC_CONFIGURED, true, reasons::CONFIGURED, message);
    }

    /// The manager lacks rules an administrator must grant: the Transform waits.
    pub(super) fn rbac_missing(&mut self, message: &str) {
        self.condition_with_event(
            RBAC_CONFIGURED,
            false,
            reasons::RBAC_MISSING,
            message,
            (EventType::Warning, reasons::RBAC_MISSING),
        );
        self.condition(READY, false, reasons::RBAC_MISSING, message);
        self.new.phase = Some(TransformPhase::Pending);
    }

    /// The kind is served from the module of `digest`.
    pub(super) fn serving(&mut self, crd: GeneratedCrd, digest: String) {
        let message = format!("serving {} ({})", crd.kind, crd.api_version);
        self.new.generated_crd = Some(crd);
        if self.new.resolved_cue_ref.as_ref().map(|r| r.digest.as_str()) != Some(digest.as_str()) {
            self.new.resolved_cue_ref = Some(ResolvedCueRef {
                digest,
                fetched_at: Some(self.time.clone()),
            });
        }
        if self.old.phase != Some(TransformPhase::Ready) {
            self.event(EventType::Normal, reasons::READY, &message);
        }
        self.condition(READY, true, reasons::READY, message);
        self.new.phase = Some(TransformPhase::Ready);
    }

    /// Deletion waits for the instances of the kind.
    pub(super) fn waiting_for_instances(&mut self, message: &str) {
        self.condition_with_event(
            READY,
            false,
            reasons::WAITING_FOR_INSTANCES,
            message,
            (EventType::Normal, reasons::WAITING_FOR_INSTANCES),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ConditionStatus;
    use crate::api::condition_types::PAUSED;

    /// A draft over `status`, as a reconcile of generation 2 starts it.
    fn draft(status: &TransformStatus) -> Draft {
        StatusDraft::for_test(status, 2)
    }

    fn condition<'a>(status: &'a TransformStatus, type_: &str) -> (&'a str, &'a str) {
        let c = status
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .unwrap_or_else(|| panic!("no {type_} condition in {status:?}"));
        let value = match c.status {
            ConditionStatus::True => "True",
            ConditionStatus::False => "False",
            ConditionStatus::Unknown => "Unknown",
        };
        (value, c.reason.as_str())
    }

    fn events(d: &Draft) -> Vec<String> {
        d.event_reasons()
    }

    fn crd() -> GeneratedCrd {
        GeneratedCrd {
            api_version: "apps.example.com/v1alpha1".into(),
            kind: "WebService".into(),
            name: "webservices.apps.example.com".into(),
            plural: "webservices".into(),
        }
    }

    /// A Transform that was serving.
    fn ready() -> TransformStatus {
        let mut d = draft(&TransformStatus::default());
        d.authorized(Allowance::Cluster, "platform");
        d.fetched("embedded module webservice (sha256:1)".into());
        d.extracted();
        d.crd_written("webservices.apps.example.com", true);
        d.established("webservices.apps.example.com");
        d.rbac_configured("4 rule(s) for the manager".into());
        d.serving(crd(), "sha256:1".into());
        d.new
    }

    #[test]
    fn a_first_pass_serves_with_every_condition_true_and_two_events() {
        let mut d = draft(&TransformStatus::default());
        d.authorized(Allowance::Restricted, "team-a");
        d.fetched("embedded module webservice (sha256:1)".into());
        d.extracted();
        d.crd_written("webservices.apps.example.com", true);
        d.established("webservices.apps.example.com");
        d.rbac_configured("4 rule(s) for the manager".into());
        d.serving(crd(), "sha256:1".into());
        #[rustfmt::skip]
        let expected = [
            (AUTHORIZED, "True", reasons::RESTRICTED), (CUE_FETCHED, "True", reasons::FETCHED),
            (SCHEMA_EXTRACTED, "True", reasons::EXTRACTED), (SCHEMA_COMPATIBLE, "True", reasons::COMPATIBLE),
            (CRD_GENERATED, "True", reasons::ESTABLISHED), (RBAC_CONFIGURED, "True", reasons::CONFIGURED),
            (READY, "True", reasons::READY),
        ];
        for (type_, status, reason) in expected {
            assert_eq!(condition(&d.new, type_), (status, reason), "{type_}");
        }
        assert_eq!(d.new.phase, Some(TransformPhase::Ready));
        assert_eq!(events(&d), [reasons::CRD_GENERATED, reasons::READY]);
        assert_eq!(d.new.observed_generation, Some(2));
        assert_eq!(d.new.resolved_cue_ref.as_ref().unwrap().digest, "sha256:1");
    }

    #[test]
    fn a_resync_of_a_serving_transform_records_no_event() {
        let before = ready();
        let mut d = draft(&before);
        d.authorized(Allowance::Cluster, "platform");
        d.fetched("embedded module webservice (sha256:1)".into());
        d.extracted();
        d.crd_written("webservices.apps.example.com", false);
        d.established("webservices.apps.example.com");
        d.rbac_configured("4 rule(s) for the manager".into());
        d.serving(crd(), "sha256:1".into());
        assert!(d.events.is_empty(), "{:?}", events(&d));
        assert_eq!(d.new.conditions, before.conditions, "no condition moved");
        assert_eq!(d.new.resolved_cue_ref, before.resolved_cue_ref, "fetchedAt kept");
    }

    /// Every way a stage fails: the stage's condition and Ready go False with the reason, the
    /// phase is Failed, and the event is recorded on the transition only.
    #[test]
    fn each_failing_stage_is_failed_once_with_its_reason() {
        #[rustfmt::skip]
        let cases = [
            (AUTHORIZED, reasons::NOT_ALLOWED, reasons::NOT_ALLOWED),
            (CUE_FETCHED, "CueFetchFailed", reasons::CUE_FETCH_FAILED),
            (CUE_FETCHED, "InvalidReference", reasons::CUE_FETCH_FAILED),
            (CUE_FETCHED, "SourceNotAllowed", reasons::CUE_FETCH_FAILED),
            (CUE_FETCHED, "InvalidModule", reasons::CUE_FETCH_FAILED),
            (SCHEMA_EXTRACTED, "SchemaUnsupported", reasons::CUE_RENDER_FAILED),
            (SCHEMA_COMPATIBLE, reasons::BREAKING_CHANGE, reasons::BREAKING_CHANGE),
            (CRD_GENERATED, reasons::KIND_CONFLICT, reasons::KIND_CONFLICT),
            (CRD_GENERATED, reasons::NAMES_NOT_ACCEPTED, reasons::CRD_GENERATION_FAILED),
            (CRD_GENERATED, reasons::CRD_NOT_ESTABLISHED, reasons::CRD_GENERATION_FAILED),
            (RBAC_CONFIGURED, reasons::RBAC_CONFLICT, reasons::RBAC_CONFLICT),
            (RBAC_CONFIGURED, reasons::RBAC_FAILED, reasons::RBAC_FAILED),
        ];
        for (stage, reason, event) in cases {
            let mut d = draft(&ready());
            let stop = TransformStop::failed(stage, reason, "why".into(), event, Action::await_change());
            assert!(d.conclude(Err(stop)).is_ok());
            assert_eq!(condition(&d.new, stage), ("False", reason), "{stage}/{reason}");
            assert_eq!(condition(&d.new, READY), ("False", reason), "{stage}/{reason}");
            assert_eq!(d.new.phase, Some(TransformPhase::Failed));
            assert_eq!(events(&d), [event], "{stage}/{reason}");

            // The same failure again: nothing new to tell.
            let mut again = draft(&d.new);
            let stop = TransformStop::failed(stage, reason, "why".into(), event, Action::await_change());
            assert!(again.conclude(Err(stop)).is_ok());
            assert!(again.events.is_empty(), "{stage}/{reason}: {:?}", events(&again));
        }
    }

    #[test]
    fn a_failed_transform_that_serves_again_says_ready_once() {
        let mut failed = draft(&ready());
        failed.fail(CUE_FETCHED, "CueFetchFailed", "unreachable", reasons::CUE_FETCH_FAILED);
        let mut d = draft(&failed.new);
        d.fetched("oci module card (sha256:2)".into());
        d.serving(crd(), "sha256:2".into());
        assert_eq!(condition(&d.new, CUE_FETCHED), ("True", reasons::FETCHED));
        assert_eq!(condition(&d.new, READY), ("True", reasons::READY));
        assert_eq!(events(&d), [reasons::READY]);
        assert_eq!(d.new.resolved_cue_ref.as_ref().unwrap().digest, "sha256:2");
    }

    #[test]
    fn a_stale_module_is_served_and_said_once() {
        let mut d = draft(&ready());
        d.fetched_stale("registry unreachable; serving the cached resolution");
        d.serving(crd(), "sha256:1".into());
        assert_eq!(condition(&d.new, CUE_FETCHED), ("False", reasons::CUE_FETCH_FAILED));
        assert_eq!(condition(&d.new, READY), ("True", reasons::READY));
        assert_eq!(events(&d), [reasons::CUE_FETCH_FAILED]);
        let mut again = draft(&d.new);
        again.fetched_stale("registry unreachable; serving the cached resolution");
        assert!(again.events.is_empty());
    }

    #[test]
    fn waiting_states_are_pending_or_generating_without_failing() {
        let mut d = draft(&TransformStatus::default());
        d.waiting_for_established("webservices.apps.example.com");
        assert!(d.conclude(Err(TransformStop::Waiting(Action::await_change()))).is_ok());
        assert_eq!(
            condition(&d.new, CRD_GENERATED),
            ("False", reasons::WAITING_FOR_ESTABLISHED)
        );
        assert_eq!(d.new.phase, Some(TransformPhase::Generating));
        assert!(d.events.is_empty());

        let mut d = draft(&TransformStatus::default());
        d.rbac_missing("the manager lacks 7 permission(s)");
        assert_eq!(condition(&d.new, RBAC_CONFIGURED), ("False", reasons::RBAC_MISSING));
        assert_eq!(condition(&d.new, READY), ("False", reasons::RBAC_MISSING));
        assert_eq!(d.new.phase, Some(TransformPhase::Pending));
        assert_eq!(events(&d), [reasons::RBAC_MISSING]);
        let mut again = draft(&d.new);
        again.rbac_missing("the manager lacks 7 permission(s)");
        assert!(again.events.is_empty());
        again.rbac_configured("the manager holds the 4 rule(s) the Transform needs".into());
        again.serving(crd(), "sha256:1".into());
        assert_eq!(condition(&again.new, RBAC_CONFIGURED), ("True", reasons::CONFIGURED));
        assert_eq!(events(&again), [reasons::READY]);
    }

    #[test]
    fn pausing_and_resuming_are_said_once() {
        let mut d = draft(&ready());
        d.pause("pequod.io/paused is \"true\"");
        assert_eq!(condition(&d.new, PAUSED), ("True", reasons::PAUSED));
        assert_eq!(d.new.phase, Some(TransformPhase::Ready), "the phase stays");
        assert_eq!(events(&d), [reasons::PAUSED]);
        let mut again = draft(&d.new);
        again.pause("pequod.io/paused is \"true\"");
        assert!(again.events.is_empty());

        let mut resumed = draft(&again.new);
        resumed.resume();
        assert_eq!(condition(&resumed.new, PAUSED), ("False", reasons::RESUMED));
        let mut never_paused = draft(&ready());
        never_paused.resume();
        assert!(never_paused.new.conditions.iter().all(|c| c.type_ != PAUSED));
    }

    #[test]
    fn deletion_waits_for_instances_and_says_so_once() {
        let mut d = draft(&ready());
        d.waiting_for_instances("deletion waits until the 2 instance(s) of WebService are deleted");
        assert_eq!(condition(&d.new, READY), ("False", reasons::WAITING_FOR_INSTANCES));
        assert_eq!(events(&d), [reasons::WAITING_FOR_INSTANCES]);
        let mut again = draft(&d.new);
        again.waiting_for_instances("deletion waits until the 1 instance(s) of WebService are deleted");
        assert!(again.events.is_empty());
    }

    #[test]
    fn a_reconcile_error_leaves_the_status_alone() {
        let before = ready();
        let mut d = draft(&before);
        let error = Error::MissingField("metadata.namespace");
        assert!(d.conclude(Err(TransformStop::Error(error))).is_err());
        assert_eq!(d.new.conditions, before.conditions);
        assert!(d.events.is_empty());
    }
}
