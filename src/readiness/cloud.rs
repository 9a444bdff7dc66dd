//! Readiness of cloud resources: what AWS Controllers for Kubernetes (ACK), Google's Config
//! Connector and Azure Service Operator (ASO) write in a resource's `status.conditions`.
//!
//! One gate type, `CloudResourceReady`, reads whichever controller owns the resource's API
//! group, so a module renders the same gate for every cloud. Each controller says three things
//! in its own words: in sync (Ready), failed until someone changes something (Failed at once,
//! with the controller's message, rather than waiting for the gate's timeout), or still trying
//! (Waiting, with the controller's message).

use serde_json::Value;

use super::{GateState, condition, cut, int};

/// The cloud controllers Pequod reads, known by the API groups they serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloudController {
    /// AWS Controllers for Kubernetes: `<service>.services.k8s.aws`.
    Ack,
    /// Config Connector: `<service>.cnrm.cloud.google.com`.
    ConfigConnector,
    /// Azure Service Operator v2: `<service>.azure.com`.
    AzureServiceOperator,
}

/// Config Connector's `Ready` reasons that stay until the spec or a dependency is changed.
pub const CONFIG_CONNECTOR_TERMINAL_REASONS: &[&str] = &["UpdateFailed", "DependencyInvalid"];

/// Most characters of a controller's message a node's status repeats.
const MAX_MESSAGE_CHARS: usize = 512;
/// Most characters of a condition's reason (a CamelCase word by convention).
const MAX_REASON_CHARS: usize = 64;

impl CloudController {
    /// The controller serving `api_version`'s group, if Pequod knows it.
    pub fn of(api_version: &str) -> Option<Self> {
        let (group, _) = api_version.rsplit_once('/')?;
        if group.ends_with(".services.k8s.aws") {
            Some(Self::Ack)
        } else if group.ends_with(".cnrm.cloud.google.com") {
            Some(Self::ConfigConnector)
        } else if group.ends_with(".azure.com") {
            Some(Self::AzureServiceOperator)
        } else {
            None
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Ack => "the ACK controller",
            Self::ConfigConnector => "Config Connector",
            Self::AzureServiceOperator => "Azure Service Operator",
        }
    }
}

/// Why a `CloudResourceReady` gate cannot be used on an object of `api_version`, if it cannot.
pub fn check_gate_target(api_version: &str) -> Result<(), String> {
    match CloudController::of(api_version) {
        Some(_) => Ok(()),
        None => Err(format!(
            "a CloudResourceReady gate reads ACK (*.services.k8s.aws), Config Connector \
             (*.cnrm.cloud.google.com) or Azure Service Operator (*.azure.com) resources, not {api_version}"
        )),
    }
}

/// The state of a cloud resource as its controller reports it.
pub fn cloud_resource_state(object: &Value) -> GateState {
    let api_version = object.get("apiVersion").and_then(Value::as_str).unwrap_or_default();
    match CloudController::of(api_version) {
        Some(CloudController::Ack) => ack(object),
        Some(CloudController::ConfigConnector) => config_connector(object),
        Some(CloudController::AzureServiceOperator) => azure_service_operator(object),
        None => GateState::Failed(check_gate_target(api_version).err().unwrap_or_default()),
    }
}

/// ACK: `ACK.Terminal=True` fails; `ACK.ResourceSynced=True` is ready; `ACK.Recoverable=True`
/// is an error the controller retries. ACK's conditions carry no generation: after a spec
/// change the gate goes by ACK's latest report, which may still be about the previous spec.
fn ack(object: &Value) -> GateState {
    let name = CloudController::Ack.name();
    if let Some(terminal) = true_condition(object, "ACK.Terminal") {
        return GateState::Failed(format!("{name} reports a terminal error{}", said(terminal)));
    }
    if true_condition(object, "ACK.ResourceSynced").is_some() {
        return GateState::Ready;
    }
    if let Some(recoverable) = true_condition(object, "ACK.Recoverable") {
        return GateState::Waiting(format!(
            "{name} reports a recoverable error, retrying{}",
            said(recoverable)
        ));
    }
    match condition(object, "ACK.ResourceSynced") {
        Some(synced) => GateState::Waiting(format!("{name} has not synced the resource yet{}", said(synced))),
        None => GateState::Waiting(format!(
            "{name} has not reported ACK.ResourceSynced yet (is it installed and watching this namespace?)"
        )),
    }
}

/// Config Connector: `Ready=True` for the latest generation is ready; `Ready=False` with a
/// terminal reason fails; any other reason waits.
fn config_connector(object: &Value) -> GateState {
    let name = CloudController::ConfigConnector.name();
    let Some(ready) = condition(object, "Ready") else {
        return GateState::Waiting(format!(
            "{name} has not reported Ready yet (is it installed and watching this namespace?)"
        ));
    };
    // A verdict on an earlier spec says nothing of the latest: an old error does not fail it.
    if int(object, "/status/observedGeneration") < int(object, "/metadata/generation") {
        return GateState::Waiting(format!("{name} has not observed the latest spec"));
    }
    let status = field(ready, "status");
    let reason = cut(field(ready, "reason"), MAX_REASON_CHARS);
    if status == "False" && CONFIG_CONNECTOR_TERMINAL_REASONS.contains(&reason.as_str()) {
        return GateState::Failed(format!("{name} reports {reason}{}", told(ready)));
    }
    if status == "True" {
        return GateState::Ready;
    }
    let reason = if reason.is_empty() {
        "not ready".to_string()
    } else {
        reason
    };
    GateState::Waiting(format!("{name} reports {reason}{}", told(ready)))
}

/// ASO: `Ready=True` for the latest generation is ready; `Ready=False` with severity `Error`
/// fails; a `Warning` is an error ASO retries; anything else is progress.
fn azure_service_operator(object: &Value) -> GateState {
    let name = CloudController::AzureServiceOperator.name();
    let Some(ready) = condition(object, "Ready") else {
        return GateState::Waiting(format!(
            "{name} has not reported Ready yet (is it installed and watching this namespace?)"
        ));
    };
    let observed = ready.get("observedGeneration").and_then(Value::as_i64).unwrap_or(0);
    if observed < int(object, "/metadata/generation") {
        return GateState::Waiting(format!("{name} has not observed the latest spec"));
    }
    let status = field(ready, "status");
    let severity = field(ready, "severity");
    if status == "False" && severity == "Error" {
        return GateState::Failed(format!("{name} reports an error{}", said(ready)));
    }
    match (status, severity) {
        ("True", _) => GateState::Ready,
        ("False", "Warning") => GateState::Waiting(format!("{name} reports an error, retrying{}", said(ready))),
        _ => GateState::Waiting(format!("{name} reports the resource is not ready yet{}", said(ready))),
    }
}

fn true_condition<'a>(object: &'a Value, type_: &str) -> Option<&'a Value> {
    condition(object, type_).filter(|c| field(c, "status") == "True")
}

fn field<'a>(condition: &'a Value, name: &str) -> &'a str {
    condition.get(name).and_then(Value::as_str).unwrap_or_default()
}

/// `: <reason>: <message>` of a condition, bounded, or nothing when it says nothing.
fn said(condition: &Value) -> String {
    bounded([field(condition, "reason"), field(condition, "message")])
}

/// `: <message>` of a condition whose reason is already named, bounded.
fn told(condition: &Value) -> String {
    bounded([field(condition, "message"), ""])
}

fn bounded(parts: [&str; 2]) -> String {
    let parts: Vec<&str> = parts.into_iter().filter(|p| !p.is_empty()).collect();
    if parts.is_empty() {
        return String::new();
    }
    format!(": {}", cut(&parts.join(": "), MAX_MESSAGE_CHARS))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn with_conditions(api_version: &str, generation: i64, status: Value) -> Value {
        json!({
            "apiVersion": api_version,
            "kind": "Bucket",
            "metadata": {"name": "b", "generation": generation},
            "status": status,
        })
    }

    fn ack_bucket(conditions: Value) -> Value {
        with_conditions("s3.services.k8s.aws/v1alpha1", 1, json!({"conditions": conditions}))
    }

    #[test]
    fn controllers_are_known_by_their_groups_only() {
        assert_eq!(
            CloudController::of("s3.services.k8s.aws/v1alpha1"),
            Some(CloudController::Ack)
        );
        assert_eq!(
            CloudController::of("storage.cnrm.cloud.google.com/v1beta1"),
            Some(CloudController::ConfigConnector)
        );
        assert_eq!(
            CloudController::of("storage.azure.com/v1api20230101"),
            Some(CloudController::AzureServiceOperator)
        );
        for other in [
            "apps/v1",
            "v1",
            "services.k8s.aws.example.com/v1",
            "azure.com.evil.io/v1",
            "notazure.com",
        ] {
            assert_eq!(CloudController::of(other), None, "{other}");
            assert!(check_gate_target(other).is_err());
        }
    }

    #[test]
    fn ack_synced_is_ready_and_terminal_fails_with_the_controllers_message() {
        let synced = ack_bucket(json!([{"type": "ACK.ResourceSynced", "status": "True"}]));
        assert_eq!(cloud_resource_state(&synced), GateState::Ready);

        let terminal = ack_bucket(json!([
            {"type": "ACK.ResourceSynced", "status": "True"},
            {"type": "ACK.Terminal", "status": "True", "message": "InvalidBucketName: The specified bucket is not valid."},
        ]));
        assert_eq!(
            cloud_resource_state(&terminal),
            GateState::Failed(
                "the ACK controller reports a terminal error: InvalidBucketName: The specified bucket is not valid."
                    .into()
            )
        );
        let cleared = ack_bucket(json!([
            {"type": "ACK.ResourceSynced", "status": "True"},
            {"type": "ACK.Terminal", "status": "False"},
        ]));
        assert_eq!(cloud_resource_state(&cleared), GateState::Ready);
    }

    #[test]
    fn ack_recoverable_and_unsynced_wait_saying_why() {
        let recoverable = ack_bucket(json!([
            {"type": "ACK.ResourceSynced", "status": "False", "message": "Resource not synced"},
            {"type": "ACK.Recoverable", "status": "True", "message": "AccessDenied: not authorized"},
        ]));
        assert_eq!(
            cloud_resource_state(&recoverable),
            GateState::Waiting(
                "the ACK controller reports a recoverable error, retrying: AccessDenied: not authorized".into()
            )
        );
        let unsynced = ack_bucket(json!([{"type": "ACK.ResourceSynced", "status": "False", "reason": "Syncing"}]));
        assert_eq!(
            cloud_resource_state(&unsynced),
            GateState::Waiting("the ACK controller has not synced the resource yet: Syncing".into())
        );
        let GateState::Waiting(silent) = cloud_resource_state(&ack_bucket(json!([]))) else {
            panic!("a resource no controller has looked at waits");
        };
        assert!(silent.contains("has not reported ACK.ResourceSynced"), "{silent}");
    }

    #[test]
    fn config_connector_ready_for_the_latest_generation_and_terminal_reasons_fail() {
        let kcc = |generation, observed, ready: Value| {
            with_conditions(
                "storage.cnrm.cloud.google.com/v1beta1",
                generation,
                json!({"observedGeneration": observed, "conditions": [ready]}),
            )
        };
        let up_to_date = json!({"type": "Ready", "status": "True", "reason": "UpToDate"});
        assert_eq!(cloud_resource_state(&kcc(2, 2, up_to_date.clone())), GateState::Ready);
        assert_eq!(
            cloud_resource_state(&kcc(3, 2, up_to_date)),
            GateState::Waiting("Config Connector has not observed the latest spec".into())
        );
        for reason in CONFIG_CONNECTOR_TERMINAL_REASONS {
            let failed = json!({"type": "Ready", "status": "False", "reason": reason, "message": "bucket name taken"});
            assert_eq!(
                cloud_resource_state(&kcc(3, 3, failed.clone())),
                GateState::Failed(format!("Config Connector reports {reason}: bucket name taken"))
            );
            assert_eq!(
                cloud_resource_state(&kcc(4, 3, failed)),
                GateState::Waiting("Config Connector has not observed the latest spec".into()),
                "an error about an earlier spec does not fail the latest"
            );
        }
        let long = json!({"type": "Ready", "status": "False", "reason": "R".repeat(1000)});
        let GateState::Waiting(message) = cloud_resource_state(&kcc(1, 1, long)) else {
            panic!("an unknown reason waits");
        };
        assert!(message.len() < 100, "{message}");
        let dependency = json!({"type": "Ready", "status": "False", "reason": "DependencyNotReady", "message": "waiting for project"});
        assert_eq!(
            cloud_resource_state(&kcc(1, 1, dependency)),
            GateState::Waiting("Config Connector reports DependencyNotReady: waiting for project".into())
        );
    }

    #[test]
    fn aso_severity_error_fails_warning_retries_and_generation_is_per_condition() {
        let aso = |generation, ready: Value| {
            with_conditions(
                "storage.azure.com/v1api20230101",
                generation,
                json!({"conditions": [ready]}),
            )
        };
        let ready = json!({"type": "Ready", "status": "True", "severity": "", "observedGeneration": 2});
        assert_eq!(cloud_resource_state(&aso(2, ready.clone())), GateState::Ready);
        assert_eq!(
            cloud_resource_state(&aso(3, ready)),
            GateState::Waiting("Azure Service Operator has not observed the latest spec".into())
        );
        let error = json!({"type": "Ready", "status": "False", "severity": "Error", "reason": "BadRequest", "message": "name invalid", "observedGeneration": 1});
        assert_eq!(
            cloud_resource_state(&aso(1, error.clone())),
            GateState::Failed("Azure Service Operator reports an error: BadRequest: name invalid".into())
        );
        assert_eq!(
            cloud_resource_state(&aso(2, error)),
            GateState::Waiting("Azure Service Operator has not observed the latest spec".into()),
            "an error about an earlier spec does not fail the latest"
        );
        let warning = json!({"type": "Ready", "status": "False", "severity": "Warning", "reason": "ResourceGroupNotFound", "observedGeneration": 1});
        assert_eq!(
            cloud_resource_state(&aso(1, warning)),
            GateState::Waiting("Azure Service Operator reports an error, retrying: ResourceGroupNotFound".into())
        );
        let reconciling = json!({"type": "Ready", "status": "Unknown", "severity": "Info", "reason": "Reconciling", "observedGeneration": 1});
        assert_eq!(
            cloud_resource_state(&aso(1, reconciling)),
            GateState::Waiting("Azure Service Operator reports the resource is not ready yet: Reconciling".into())
        );
    }

    #[test]
    fn a_controllers_long_message_is_cut() {
        let long = "x".repeat(5000);
        let terminal = ack_bucket(json!([{"type": "ACK.Terminal", "status": "True", "message": long}]));
        let GateState::Failed(message) = cloud_resource_state(&terminal) else {
            panic!("terminal fails");
        };
        assert!(message.len() < 600 && message.ends_with("..."), "{}", message.len());
    }
}
