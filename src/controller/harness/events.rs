//! Events of the reconciles.

/// Cuts an event note to the length the events API accepts.
pub fn truncate(mut s: String) -> String {
    if s.len() > 1000 {
        let mut cut = 1000;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// Publishes an event in the background: an event must not hold up the reconcile.
pub fn publish(
    recorder: &kube::runtime::events::Recorder,
    reference: k8s_openapi::api::core::v1::ObjectReference,
    event: kube::runtime::events::Event,
) {
    let recorder = recorder.clone();
    tokio::spawn(async move {
        if let Err(e) = recorder.publish(&event, &reference).await {
            tracing::warn!(error = %e, reason = %event.reason, "publishing event failed");
        }
    });
}

/// A Reconcile event of the given type.
pub fn reconcile_event(
    type_: kube::runtime::events::EventType,
    reason: &str,
    note: impl Into<String>,
) -> kube::runtime::events::Event {
    kube::runtime::events::Event {
        type_,
        reason: reason.into(),
        note: Some(truncate(note.into())),
        action: "Reconcile".into(),
        secondary: None,
    }
}
