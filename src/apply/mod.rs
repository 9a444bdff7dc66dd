//! Writing graph objects to the cluster with server-side apply, and resolving their kinds.

mod impersonation;
pub mod nesting;

use crate::api::names::{
    ADOPTED_FROM_ANNOTATION, GRAPH_LABEL, GRAPH_NAMESPACE_LABEL, GRAPH_UID_ANNOTATION, MANAGED_BY_LABEL, NODE_LABEL,
};
use crate::error::ErrorCategory;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kube::api::{DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use kube::discovery::{ApiResource, Scope};
use kube::{Api, Client};
use serde_json::Value;

pub use impersonation::{Impersonation, ServiceAccount};

use crate::api::{ApplyMode, ConflictPolicy, Node};
use crate::executor::object::{gvk_label, other_managers};
use crate::metrics::Metrics;

/// What a `Read` node found.
#[derive(Debug)]
pub enum Read {
    One(Box<DynamicObject>),
    Absent,
    /// More than one object matches its selector.
    Several,
}

/// A kind resolved through discovery.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub resource: ApiResource,
    pub namespaced: bool,
}

impl Resolved {
    pub fn api(&self, client: &Client, namespace: Option<&str>) -> Api<DynamicObject> {
        match (self.namespaced, namespace) {
            (true, Some(ns)) => Api::namespaced_with(client.clone(), ns, &self.resource),
            _ => Api::all_with(client.clone(), &self.resource),
        }
    }

    /// Cache key of the kind: `group/version/Kind`.
    pub fn key(&self) -> String {
        gvk_label(&self.resource.api_version, &self.resource.kind)
    }
}

/// Why an object could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("kind {kind} of {api_version} is not served by the cluster: {message}")]
    UnknownKind {
        api_version: String,
        kind: String,
        message: String,
    },
    #[error("{message}")]
    Conflict { message: String },
    #[error("forbidden: {message}")]
    Forbidden { message: String },
    #[error("rejected by the apiserver: {message}")]
    Invalid { message: String },
    #[error("generating the Secret's values: {message}")]
    Generate { message: String },
    #[error("adopting failed: {message}")]
    AdoptionFailed { message: String },
    #[error("the apiserver answered {code}: {message}")]
    Server { code: u16, message: String },
    #[error("discovery of {kind} in {api_version} failed: {message}")]
    Discovery {
        api_version: String,
        kind: String,
        message: String,
    },
    #[error("Kubernetes API: {0}")]
    Api(#[source] kube::Error),
    /// The write gate closed: the replica's shard Leases went unrenewed for a renew
    /// deadline, and another replica may hold the graph now.
    #[error("this replica no longer holds the graph's shard")]
    Fenced,
}

impl ErrorCategory for ApplyError {
    /// The documented `AdoptionFailed` for a failed takeover, `ApplyFailed` for every other
    /// write.
    fn reason(&self) -> &'static str {
        match self {
            Self::AdoptionFailed { .. } => crate::api::reasons::ADOPTION_FAILED,
            Self::Forbidden { .. } => crate::api::reasons::FORBIDDEN,
            _ => crate::api::reasons::APPLY_FAILED,
        }
    }

    /// A refusal for want of rights passes once someone grants them, which no event of the
    /// graph announces: it is retried too.
    fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Api(_)
                | Self::Server { .. }
                | Self::UnknownKind { .. }
                | Self::Discovery { .. }
                | Self::Forbidden { .. }
        )
    }
}

impl ApplyError {
    fn from_kube(e: kube::Error) -> Self {
        match &e {
            kube::Error::Api(s) if s.code == 409 => Self::Conflict {
                message: s.message.clone(),
            },
            kube::Error::Api(s) if s.code == 403 => Self::Forbidden {
                message: s.message.clone(),
            },
            kube::Error::Api(s) if s.code == 422 || s.code == 400 => Self::Invalid {
                message: s.message.clone(),
            },
            _ => Self::Api(e),
        }
    }
}

/// What an apply did.
#[derive(Debug, Clone)]
pub struct Applied {
    pub object: DynamicObject,
    /// Whether a write request was sent.
    pub wrote: bool,
}

/// Resolves kinds and applies objects, as the operator or as a service account. Cheap to
/// clone.
#[derive(Clone)]
pub struct Applier {
    client: Client,
    metrics: Arc<Metrics>,
    kinds: Arc<Mutex<HashMap<(String, String), Resolved>>>,
    impersonation: Option<Arc<Impersonation>>,
    /// Set on replicas that share graphs in shards: no write once it says no.
    write_gate: Option<WriteGate>,
}

/// Whether writes may still be sent.
pub type WriteGate = Arc<dyn Fn() -> bool + Send + Sync>;

impl Applier {
    pub fn new(client: Client, metrics: Arc<Metrics>) -> Self {
        Self {
            client,
            metrics,
            kinds: Arc::default(),
            impersonation: None,
            write_gate: None,
        }
    }

    /// Writes only while `gate` says they may be sent (a replica's shard Leases are current).
    pub fn fenced_by(mut self, gate: WriteGate) -> Self {
        self.write_gate = Some(gate);
        self
    }

    fn fenced(&self) -> Result<(), ApplyError> {
        match &self.write_gate {
            Some(gate) if !gate() => Err(ApplyError::Fenced),
            _ => Ok(()),
        }
    }

    /// Lets [`Applier::acting_as`] build clients from the operator's configuration.
    pub fn with_impersonation(mut self, config: kube::Config) -> Self {
        self.impersonation = Some(Arc::new(Impersonation::new(config)));
        self
    }

    /// An applier whose reads and writes the apiserver authorizes as `account`; kinds are
    /// still resolved with the operator's discovery.
    pub fn acting_as(&self, account: &ServiceAccount) -> Result<Self, kube::Error> {
        // Never the operator's own client in its place: that would hand out its rights.
        let impersonation = self.impersonation.as_ref().ok_or_else(|| {
            kube::Error::Service(format!("cannot act as service account {account}: no impersonation configured").into())
        })?;
        let client = impersonation.client(account)?;
        Ok(Self { client, ..self.clone() })
    }

    /// Resolves `apiVersion`/`kind` through discovery. Results are cached; a miss asks the
    /// apiserver again, so kinds registered a moment ago (generated CRDs) resolve.
    pub async fn resolve(&self, api_version: &str, kind: &str) -> Result<Resolved, ApplyError> {
        let key = (api_version.to_string(), kind.to_string());
        if let Some(hit) = self.kinds.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return Ok(hit.clone());
        }
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        let gvk = GroupVersionKind::gvk(group, version, kind);
        let (resource, caps) = kube::discovery::pinned_kind(&self.client, &gvk)
            .await
            .map_err(|e| discovery_error(api_version, kind, e))?;
        let resolved = Resolved {
            resource,
            namespaced: caps.scope == Scope::Namespaced,
        };
        self.kinds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, resolved.clone());
        Ok(resolved)
    }

    /// Forgets a kind, after the apiserver said it no longer serves it.
    /// The rendered objects confined to `namespace` as [`crate::instance_graph::confine`] says,
    /// with each kind's scope from the cached discovery (a kind discovery does not know is
    /// `Unknown`), and the render's violations with those of confinement.
    pub async fn confined(
        &self,
        output: &crate::cue::RenderOutput,
        namespace: &str,
        cluster_scoped: bool,
    ) -> (Vec<crate::api::Node>, Vec<crate::api::Violation>) {
        use crate::instance_graph::Scope;
        let mut scopes = std::collections::HashMap::new();
        for node in &output.nodes {
            let key = (node.api_version().to_string(), node.kind().to_string());
            if scopes.contains_key(&key) {
                continue;
            }
            let scope = match self.resolve(&key.0, &key.1).await {
                Ok(r) if r.namespaced => Scope::Namespaced,
                Ok(_) => Scope::Cluster,
                Err(_) => Scope::Unknown,
            };
            scopes.insert(key, scope);
        }
        let mut nodes = output.nodes.clone();
        let mut violations = output.violations.clone();
        violations.extend(crate::instance_graph::confine(
            &mut nodes,
            namespace,
            cluster_scoped,
            |n| {
                scopes
                    .get(&(n.api_version().to_string(), n.kind().to_string()))
                    .copied()
                    .unwrap_or(Scope::Unknown)
            },
        ));
        (nodes, violations)
    }

    pub fn forget(&self, api_version: &str, kind: &str) {
        self.kinds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(api_version.to_string(), kind.to_string()));
    }

    /// Writes `desired` for `node` as field manager `manager`, according to the node's apply
    /// policy. `live` is the object as last seen (None when absent); `reclaim` forces the apply
    /// because the fields were Pequod's before someone else changed them (drift), whatever the
    /// conflict policy says.
    pub async fn apply(
        &self,
        node: &Node,
        manager: &str,
        resolved: &Resolved,
        desired: &Value,
        live: Option<&DynamicObject>,
        reclaim: bool,
    ) -> Result<Applied, ApplyError> {
        let policy = &node.apply_policy;
        let mode = match policy.mode {
            ApplyMode::Apply => "Apply",
            ApplyMode::Create => "Create",
            ApplyMode::Adopt => "Adopt",
            ApplyMode::Read => {
                return Err(ApplyError::Invalid {
                    message: format!("node {} is read, never written", node.id),
                });
            }
        };
        self.fenced()?;
        let gvk = resolved.key();
        let started = Instant::now();
        let result = match policy.mode {
            ApplyMode::Create => self.create(resolved, desired, live).await,
            // Read returned above.
            ApplyMode::Apply | ApplyMode::Read => {
                let force = policy.conflict_policy == ConflictPolicy::Force || reclaim;
                self.server_side_apply(resolved, desired, manager, force)
                    .await
                    .map(|object| Applied { object, wrote: true })
            }
            ApplyMode::Adopt => self.adopt(resolved, desired, manager, live).await,
        };
        let took = started.elapsed();
        self.metrics
            .apply_duration_seconds
            .with_label_values(&[mode, &gvk])
            .observe(took.as_secs_f64());
        tracing::debug!(
            mode,
            gvk = %gvk,
            object = desired["metadata"]["name"].as_str().unwrap_or_default(),
            duration_ms = took.as_millis() as u64,
            ok = result.is_ok(),
            "apply finished"
        );
        if result.as_ref().map(|a| a.wrote).unwrap_or(true) {
            let outcome = if result.is_ok() { "success" } else { "failure" };
            self.metrics.apply_total.with_label_values(&[outcome, mode, &gvk]).inc();
        }
        if let Err(ApplyError::UnknownKind { .. }) = &result {
            self.forget(&resolved.resource.api_version, &resolved.resource.kind);
        }
        result
    }

    async fn server_side_apply(
        &self,
        resolved: &Resolved,
        desired: &Value,
        manager: &str,
        force: bool,
    ) -> Result<DynamicObject, ApplyError> {
        let (namespace, name) = identity(desired);
        let api = resolved.api(&self.client, namespace.as_deref());
        let mut params = PatchParams::apply(manager);
        if force {
            params = params.force();
        }
        api.patch(&name, &params, &Patch::Apply(desired))
            .await
            .map_err(|e| self.classify(resolved, e))
    }

    async fn create(
        &self,
        resolved: &Resolved,
        desired: &Value,
        live: Option<&DynamicObject>,
    ) -> Result<Applied, ApplyError> {
        if let Some(existing) = live {
            return Ok(Applied {
                object: existing.clone(),
                wrote: false,
            });
        }
        // Values the graph asks Pequod to generate exist from here on, in the Secret only.
        let filled = crate::graph::generated::fill(desired).map_err(|message| ApplyError::Generate { message })?;
        let desired = filled.as_ref().unwrap_or(desired);
        let (namespace, name) = identity(desired);
        let api = resolved.api(&self.client, namespace.as_deref());
        let object: DynamicObject = serde_json::from_value(desired.clone()).map_err(|e| ApplyError::Invalid {
            message: format!("object: {e}"),
        })?;
        match api.create(&PostParams::default(), &object).await {
            Ok(created) => Ok(Applied {
                object: created,
                wrote: true,
            }),
            // Created meanwhile by someone else: Create mode never updates.
            Err(kube::Error::Api(s)) if s.code == 409 => {
                let existing = api.get(&name).await.map_err(|e| self.classify(resolved, e))?;
                Ok(Applied {
                    object: existing,
                    wrote: false,
                })
            }
            Err(e) => Err(self.classify(resolved, e)),
        }
    }

    async fn adopt(
        &self,
        resolved: &Resolved,
        desired: &Value,
        manager: &str,
        live: Option<&DynamicObject>,
    ) -> Result<Applied, ApplyError> {
        // Taking over from other managers is an adoption; an object only Pequod wrote is not.
        let adopting = live.is_some_and(|o| !other_managers(o, manager).is_empty());
        let started = Instant::now();
        let result = self.server_side_apply(resolved, desired, manager, true).await;
        if adopting {
            let outcome = if result.is_ok() { "success" } else { "error" };
            self.metrics.adoption_total.with_label_values(&[outcome]).inc();
            self.metrics
                .adoption_duration_seconds
                .observe(started.elapsed().as_secs_f64());
            return match result {
                Ok(object) => Ok(Applied { object, wrote: true }),
                // Rights are wanting, not the adoption: said as such.
                Err(e @ ApplyError::Forbidden { .. }) => Err(e),
                Err(e) => Err(ApplyError::AdoptionFailed { message: e.to_string() }),
            };
        }
        result.map(|object| Applied { object, wrote: true })
    }

    fn classify(&self, resolved: &Resolved, e: kube::Error) -> ApplyError {
        match &e {
            // The kind vanished (its CRD was deleted): resolve again next time.
            kube::Error::Api(s)
                if s.code == 404
                    && s.reason == "NotFound"
                    && s.message.contains("the server could not find the requested resource") =>
            {
                ApplyError::UnknownKind {
                    api_version: resolved.resource.api_version.clone(),
                    kind: resolved.resource.kind.clone(),
                    message: s.message.clone(),
                }
            }
            _ => ApplyError::from_kube(e),
        }
    }

    /// Applies `empty` (an object naming only itself) as `manager`, which then owns no field:
    /// the apiserver drops its managed-fields entry.
    pub async fn release_manager(&self, resolved: &Resolved, empty: &Value, manager: &str) -> Result<(), ApplyError> {
        self.fenced()?;
        self.server_side_apply(resolved, empty, manager, false)
            .await
            .map(|_| ())
    }

    /// The kind's API as this applier's identity: what a watch of objects it reads is made with.
    pub fn api(&self, resolved: &Resolved, namespace: Option<&str>) -> Api<DynamicObject> {
        resolved.api(&self.client, namespace)
    }

    /// What a `Read` node reads in `namespace`, with this applier's rights: the object it
    /// names, or the one object its selector matches.
    pub async fn read(&self, resolved: &Resolved, namespace: Option<&str>, node: &Node) -> Result<Read, ApplyError> {
        let Some(selector) = node.read_selector() else {
            let found = self.get(resolved, namespace, node.name()).await?;
            return Ok(found.map_or(Read::Absent, |o| Read::One(Box::new(o))));
        };
        // Two are enough to tell that the selector is ambiguous.
        let params = kube::api::ListParams::default().labels(&selector).limit(2);
        let mut items = resolved
            .api(&self.client, namespace)
            .list(&params)
            .await
            .map_err(|e| self.classify(resolved, e))?
            .items;
        Ok(match (items.pop(), items.is_empty()) {
            (None, _) => Read::Absent,
            (Some(one), true) => Read::One(Box::new(one)),
            (Some(_), false) => Read::Several,
        })
    }

    /// Reads an object directly from the apiserver.
    pub async fn get(
        &self,
        resolved: &Resolved,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Option<DynamicObject>, ApplyError> {
        resolved
            .api(&self.client, namespace)
            .get_opt(name)
            .await
            .map_err(|e| self.classify(resolved, e))
    }

    /// What applying `desired` as `manager` would make of the object, without writing it (a
    /// server-side apply dry run): defaults, admission and other managers' fields included.
    pub async fn dry_run(
        &self,
        resolved: &Resolved,
        namespace: Option<&str>,
        name: &str,
        desired: &Value,
        manager: &str,
    ) -> Result<DynamicObject, kube::Error> {
        resolved
            .api(&self.client, namespace)
            .patch(
                name,
                &PatchParams::apply(manager).force().dry_run(),
                &Patch::Apply(desired),
            )
            .await
    }

    /// Deletes an object (background propagation); absent objects are fine.
    pub async fn delete(&self, resolved: &Resolved, namespace: Option<&str>, name: &str) -> Result<(), ApplyError> {
        self.fenced()?;
        match resolved
            .api(&self.client, namespace)
            .delete(name, &DeleteParams::background())
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(self.classify(resolved, e)),
        }
    }

    /// Lets go of an object: removes Pequod's labels, annotations and owner reference, leaving
    /// the object running.
    pub async fn release(&self, resolved: &Resolved, live: &DynamicObject, graph_uid: &str) -> Result<(), ApplyError> {
        self.fenced()?;
        let namespace = live.metadata.namespace.clone();
        let name = live.metadata.name.clone().unwrap_or_default();
        let owners: Vec<_> = live
            .metadata
            .owner_references
            .iter()
            .flatten()
            .filter(|o| o.uid != graph_uid)
            .collect();
        let patch = serde_json::json!({
            "metadata": {
                "labels": {GRAPH_LABEL: null, GRAPH_NAMESPACE_LABEL: null, NODE_LABEL: null, MANAGED_BY_LABEL: null},
                "annotations": {GRAPH_UID_ANNOTATION: null, (crate::api::names::GRAPH_NAME_ANNOTATION): null, ADOPTED_FROM_ANNOTATION: null},
                "ownerReferences": owners,
            }
        });
        resolved
            .api(&self.client, namespace.as_deref())
            .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .map(|_| ())
            .or_else(|e| match e {
                kube::Error::Api(s) if s.code == 404 => Ok(()),
                other => Err(self.classify(resolved, other)),
            })
    }
}

/// Only an apiserver that answers that it does not serve the kind makes it unknown (and its
/// objects gone); any other failure of discovery may pass, and says nothing about the objects.
fn discovery_error(api_version: &str, kind: &str, e: kube::Error) -> ApplyError {
    let unknown = match &e {
        kube::Error::Discovery(kube::error::DiscoveryError::MissingKind(_)) => true,
        kube::Error::Api(s) => s.code == 404,
        _ => false,
    };
    let (api_version, kind, message) = (api_version.to_string(), kind.to_string(), e.to_string());
    if unknown {
        ApplyError::UnknownKind {
            api_version,
            kind,
            message,
        }
    } else {
        ApplyError::Discovery {
            api_version,
            kind,
            message,
        }
    }
}

/// Namespace and name of an object.
pub fn identity(object: &Value) -> (Option<String>, String) {
    let meta = object.get("metadata");
    let field = |k: &str| meta.and_then(|m| m.get(k)).and_then(Value::as_str).map(str::to_string);
    (field("namespace"), field("name").unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answered(code: u16) -> kube::Error {
        let status: kube::core::Status =
            serde_json::from_value(serde_json::json!({"code": code, "message": "m", "reason": "r"})).unwrap();
        kube::Error::Api(Box::new(status))
    }

    #[test]
    fn only_a_kind_the_apiserver_says_it_does_not_serve_is_unknown() {
        let missing = kube::Error::Discovery(kube::error::DiscoveryError::MissingKind("Widget".into()));
        for (case, error) in [("missing kind", missing), ("group version not found", answered(404))] {
            assert!(
                matches!(discovery_error("x/v1", "Widget", error), ApplyError::UnknownKind { .. }),
                "{case}"
            );
        }
        for (case, error) in [
            ("unavailable aggregated API", answered(503)),
            ("forbidden", answered(403)),
            ("server error", answered(500)),
        ] {
            let e = discovery_error("x/v1", "Widget", error);
            assert!(matches!(e, ApplyError::Discovery { .. }), "{case}: {e:?}");
            assert!(e.is_transient(), "{case}");
        }
    }
}
