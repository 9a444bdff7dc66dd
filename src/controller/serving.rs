//! How a kind is served, published by the leader for every replica when instances are shared
//! among replicas (`--shards`).
//!
//! The leader runs the Transforms and each kind's rollout: it decides which module versions a
//! kind serves and which instances a staged rollout admits. Each replica renders the instances
//! of the shards it holds, so it must render exactly as the leader decided. The leader writes
//! that decision as one ConfigMap per Transform in the operator's namespace (gzip-compressed
//! JSON, signed with the graph signing key and bound to the ConfigMap's name); every replica
//! watches them, verifies the proof and serves the kind with it. The modules themselves are
//! published beside it, content-addressed ([`crate::conversion::published`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{ApiResource, DeleteParams, ObjectMeta, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde::{Deserialize, Serialize};

use super::instance::{Supervisor, TransformKey};
use crate::api::names::{MANAGED_BY_LABEL, MANAGED_BY_VALUE, ROLLOUT_STATUS_MANAGER};
use crate::conversion::published;
use crate::cue::{Module, Renderer};
use crate::executor::proof::{Allowance, GraphKey};
use crate::rollout::{Admission, InstanceKey, Selection};
use crate::runtime::shards::Shards;
use crate::runtime::shutdown::Shutdown;

/// Label naming the Transform a published serving describes.
const SERVING_LABEL: &str = "pequod.io/serving-for";
/// Annotation holding the proof of the payload.
const PROOF_ANNOTATION: &str = "pequod.io/serving-proof";
/// Data key of the gzip-compressed JSON payload.
const DATA_KEY: &str = "serving.json.gz";
/// A ConfigMap holds at most 1 MiB; the payload leaves room for the rest.
const MAX_COMPRESSED_BYTES: usize = 900 * 1024;
/// Most bytes a payload may expand to.
const MAX_EXPANDED_BYTES: u64 = 32 * 1024 * 1024;
/// Longest pending line published for an instance.
const MAX_PENDING_LINE: usize = 256;
/// How long a replica waits before trying again a serving it could not follow.
const RETRY: Duration = Duration::from_secs(5);

/// How a kind is served: what the Transform grants and which version each instance renders
/// with. Keys are `namespace/name`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Serving {
    pub transform_namespace: String,
    pub transform_name: String,
    pub transform_uid: String,
    pub group: String,
    pub version: String,
    pub kind: String,
    pub plural: String,
    /// Serve only this namespace (Transforms with `rbacScope: Namespace`).
    pub namespace: Option<String>,
    pub allowance: String,
    /// The module versions the Transform has served, the target last.
    pub served: Vec<String>,
    pub platform: String,
    pub target: String,
    /// The version instances come from while a rollout runs.
    pub current: Option<String>,
    /// The instances admitted to the target; None admits all.
    pub admitted: Option<BTreeSet<String>>,
    /// What the target would change, for each instance it has not reached (left out when
    /// the serving would not fit in a ConfigMap with them).
    pub pending: BTreeMap<String, String>,
    /// When the leader wrote it (milliseconds since the epoch, above every earlier writing of
    /// the same serving): a replica never goes back to an older one, so that a writing replayed
    /// in the ConfigMap is refused.
    #[serde(default)]
    pub published_at: i64,
}

/// Why a published serving is not followed.
#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    #[error("the serving of {transform} compresses to {bytes} bytes; a ConfigMap holds at most {MAX_COMPRESSED_BYTES}")]
    TooLarge { transform: String, bytes: usize },
    #[error("published serving {name} is not signed with the operator's key; it is not used")]
    Unsigned { name: String },
    #[error("published serving {name} is older than one this replica followed; it is not used")]
    Stale { name: String },
    #[error("published serving {name} is damaged: {message}")]
    Damaged { name: String, message: String },
    #[error("module {digest} of {transform} is not published yet")]
    ModuleMissing { transform: String, digest: String },
    #[error(transparent)]
    Published(#[from] published::PublishError),
    #[error(transparent)]
    Render(#[from] crate::cue::RenderError),
    #[error(transparent)]
    Api(#[from] kube::Error),
}

fn key_text(key: &InstanceKey) -> String {
    format!("{}/{}", key.namespace, key.name)
}

fn key_of(text: &str) -> InstanceKey {
    let (namespace, name) = text.split_once('/').unwrap_or(("", text));
    InstanceKey {
        namespace: namespace.to_string(),
        name: name.to_string(),
    }
}

impl Serving {
    /// What a kind's rollout decided, as published.
    pub fn of(
        transform: (&TransformKey, &str),
        resource: &ApiResource,
        namespace: Option<&str>,
        (allowance, served): (Allowance, &[String]),
        selection: &Selection,
    ) -> Self {
        Self {
            transform_namespace: transform.0.namespace.clone(),
            transform_name: transform.0.name.clone(),
            transform_uid: transform.1.to_string(),
            group: resource.group.clone(),
            version: resource.version.clone(),
            kind: resource.kind.clone(),
            plural: resource.plural.clone(),
            namespace: namespace.map(String::from),
            allowance: allowance.as_str().to_string(),
            served: served.to_vec(),
            platform: selection.target.platform.clone(),
            target: selection.target.digest.clone(),
            current: selection.current.as_ref().map(|m| m.digest.clone()),
            admitted: match &selection.admission {
                Admission::All => None,
                Admission::Only(keys) => Some(keys.iter().map(key_text).collect()),
            },
            pending: selection
                .pending
                .iter()
                .map(|(k, v)| (key_text(k), crate::naming::truncated(v.clone(), MAX_PENDING_LINE)))
                .collect(),
            published_at: 0,
        }
    }

    pub fn transform(&self) -> TransformKey {
        TransformKey {
            namespace: self.transform_namespace.clone(),
            name: self.transform_name.clone(),
        }
    }

    pub fn resource(&self) -> ApiResource {
        ApiResource {
            group: self.group.clone(),
            version: self.version.clone(),
            api_version: if self.group.is_empty() {
                self.version.clone()
            } else {
                format!("{}/{}", self.group, self.version)
            },
            kind: self.kind.clone(),
            plural: self.plural.clone(),
        }
    }

    /// The selection it describes, with the modules of its target and current versions.
    fn selection(&self, target: Module, current: Option<Module>) -> Selection {
        Selection {
            target,
            current,
            admission: match &self.admitted {
                None => Admission::All,
                Some(keys) => Admission::Only(keys.iter().map(|k| key_of(k)).collect()),
            },
            pending: self.pending.iter().map(|(k, v)| (key_of(k), v.clone())).collect(),
        }
    }

    /// What the leader decided, whenever it was written.
    fn decision(&self) -> Self {
        Self {
            published_at: 0,
            ..self.clone()
        }
    }
}

impl ServingError {
    /// Whether following it again may succeed without the ConfigMap changing.
    fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::ModuleMissing { .. } | Self::Published(_) | Self::Render(_) | Self::Api(_)
        )
    }
}

/// The ConfigMap publishing the serving of Transform `transform`.
pub fn config_map_name(transform: &TransformKey) -> String {
    use sha2::{Digest, Sha256};
    let owner = hex::encode(Sha256::digest(format!("{}/{}", transform.namespace, transform.name)));
    format!("{SERVING_PREFIX}{}", &owner[..16])
}

/// The ConfigMap publishing `serving`, signed with `key`; without its pending lines when it
/// would not fit with them.
pub fn to_config_map(serving: &Serving, key: &GraphKey) -> Result<ConfigMap, ServingError> {
    match encode(serving, key) {
        Err(ServingError::TooLarge { .. }) if !serving.pending.is_empty() => {
            tracing::warn!(transform = %serving.transform(), "the serving is published without the instances' pending lines: it would not fit in a ConfigMap");
            encode(
                &Serving {
                    pending: BTreeMap::new(),
                    ..serving.clone()
                },
                key,
            )
        }
        encoded => encoded,
    }
}

fn encode(serving: &Serving, key: &GraphKey) -> Result<ConfigMap, ServingError> {
    let transform = serving.transform();
    let name = config_map_name(&transform);
    let damaged = |e: &dyn std::fmt::Display| ServingError::Damaged {
        name: name.clone(),
        message: e.to_string(),
    };
    let json = serde_json::to_vec(serving).map_err(|e| damaged(&e))?;
    let compressed = published::gzip(&json, flate2::Compression::default()).map_err(|e| damaged(&e))?;
    if compressed.len() > MAX_COMPRESSED_BYTES {
        return Err(ServingError::TooLarge {
            transform: transform.to_string(),
            bytes: compressed.len(),
        });
    }
    let proof = key.sign_serving(&name, &compressed);
    Ok(ConfigMap {
        metadata: ObjectMeta {
            name: Some(name),
            labels: Some(BTreeMap::from([
                (MANAGED_BY_LABEL.to_string(), MANAGED_BY_VALUE.to_string()),
                (
                    SERVING_LABEL.to_string(),
                    crate::naming::label_value(&format!("{}.{}", transform.namespace, transform.name)),
                ),
            ])),
            annotations: Some(BTreeMap::from([(PROOF_ANNOTATION.to_string(), proof)])),
            ..ObjectMeta::default()
        },
        binary_data: Some(BTreeMap::from([(DATA_KEY.to_string(), ByteString(compressed))])),
        ..ConfigMap::default()
    })
}

/// The serving a ConfigMap publishes, if `key` signed it under the ConfigMap's name and it
/// names the Transform that name is for.
pub fn from_config_map(cm: &ConfigMap, key: &GraphKey) -> Result<Serving, ServingError> {
    let name = cm.name_any();
    let damaged = |message: String| ServingError::Damaged {
        name: name.clone(),
        message,
    };
    let compressed = published::binary_data(cm, DATA_KEY).map_err(&damaged)?;
    let proof = cm.annotations().get(PROOF_ANNOTATION).map(String::as_str);
    if !key.verify_serving(&name, compressed, proof) {
        return Err(ServingError::Unsigned { name });
    }
    let json = published::gunzip(compressed, MAX_EXPANDED_BYTES).map_err(damaged)?;
    let serving: Serving = serde_json::from_slice(&json).map_err(|e| damaged(e.to_string()))?;
    if config_map_name(&serving.transform()) != name {
        return Err(damaged(format!("it describes Transform {}", serving.transform())));
    }
    Ok(serving)
}

/// Writes the leader's servings, each only when it changed, and keeps them as decided: a
/// serving changed, deleted or replayed by someone else is written again, and one whose
/// Transform is gone is deleted.
pub struct Publisher {
    client: Client,
    namespace: String,
    key: GraphKey,
    /// What the leader decided, by ConfigMap name (recorded before it is written).
    decided: Mutex<HashMap<String, Serving>>,
    /// The latest `published_at` seen of each ConfigMap.
    stamps: Mutex<HashMap<String, i64>>,
}

impl Publisher {
    pub fn new(client: Client, namespace: String, key: GraphKey) -> Self {
        Self {
            client,
            namespace,
            key,
            decided: Mutex::default(),
            stamps: Mutex::default(),
        }
    }

    fn api(&self) -> Api<ConfigMap> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Publishes `serving` unless it is what the leader decided last.
    pub async fn publish(&self, serving: &Serving) -> Result<(), ServingError> {
        let decision = serving.decision();
        let name = config_map_name(&decision.transform());
        let previous = lock(&self.decided).insert(name, decision.clone());
        if previous.as_ref() == Some(&decision) {
            return Ok(());
        }
        self.write(&decision).await
    }

    /// Writes `decision`, stamped later than any writing of it seen.
    async fn write(&self, decision: &Serving) -> Result<(), ServingError> {
        let name = config_map_name(&decision.transform());
        let now = jiff::Timestamp::now().as_millisecond();
        let stamp = {
            let mut stamps = lock(&self.stamps);
            let stamp = stamps.get(&name).map_or(now, |seen| now.max(seen + 1));
            stamps.insert(name.clone(), stamp);
            stamp
        };
        let cm = to_config_map(
            &Serving {
                published_at: stamp,
                ..decision.clone()
            },
            &self.key,
        )?;
        let params = PatchParams::apply(ROLLOUT_STATUS_MANAGER).force();
        match self.api().patch(&name, &params, &Patch::Apply(&cm)).await {
            Ok(_) => Ok(()),
            // Made immutable by someone else: the name is Pequod's, in its own namespace.
            Err(kube::Error::Api(s)) if s.code == 422 => {
                self.delete(&name).await?;
                self.api().patch(&name, &params, &Patch::Apply(&cm)).await?;
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Withdraws the serving of `transform`: every replica stops serving its kind.
    pub async fn withdraw(&self, transform: &TransformKey) -> Result<(), kube::Error> {
        let name = config_map_name(transform);
        lock(&self.decided).remove(&name);
        self.delete(&name).await
    }

    async fn delete(&self, name: &str) -> Result<(), kube::Error> {
        match self.api().delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Keeps the published servings as decided until `shutdown`.
    pub async fn guard(self: Arc<Self>, shutdown: Shutdown) {
        let mut events = watcher(self.api(), watcher::Config::default().labels(&serving_selector()))
            .default_backoff()
            .boxed();
        loop {
            let event = tokio::select! {
                () = shutdown.wait() => return,
                event = events.next() => event,
            };
            let result = match event {
                Some(Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm))) => self.check(&cm).await,
                Some(Ok(watcher::Event::Delete(cm))) => self.restore(&cm.name_any()).await,
                Some(Ok(watcher::Event::Init | watcher::Event::InitDone)) => Ok(()),
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "watching the published servings failed; retrying");
                    Ok(())
                }
                None => return,
            };
            if let Err(e) = result {
                tracing::warn!(error = %e, "keeping a published serving as decided failed; the next change tries again");
            }
        }
    }

    /// Writes a serving again when it is not what the leader decided; deletes one whose
    /// Transform is gone, or that the operator's key did not sign.
    async fn check(&self, cm: &ConfigMap) -> Result<(), ServingError> {
        let name = cm.name_any();
        let live = from_config_map(cm, &self.key);
        if let Ok(live) = &live {
            let mut stamps = lock(&self.stamps);
            let seen = stamps.entry(name.clone()).or_insert(live.published_at);
            *seen = (*seen).max(live.published_at);
        }
        let decided = lock(&self.decided).get(&name).cloned();
        match (decided, live) {
            (Some(decided), Ok(live)) if live.decision() == decided => Ok(()),
            (Some(decided), _) => {
                tracing::warn!(configmap = %name, "a published serving differs from what the leader decided; writing it again");
                self.write(&decided).await
            }
            (None, Ok(live)) if self.transform_exists(&live).await? => Ok(()),
            (None, _) if name.starts_with(SERVING_PREFIX) => {
                tracing::info!(configmap = %name, "deleting a published serving whose Transform is gone or that is not signed");
                Ok(self.delete(&name).await?)
            }
            (None, _) => Ok(()),
        }
    }

    /// Writes again a serving deleted (or unlabelled) by someone else.
    async fn restore(&self, name: &str) -> Result<(), ServingError> {
        let decided = lock(&self.decided).get(name).cloned();
        match decided {
            Some(decided) => self.write(&decided).await,
            None => Ok(()),
        }
    }

    /// Whether the Transform a serving names still exists, as the same object.
    async fn transform_exists(&self, serving: &Serving) -> Result<bool, kube::Error> {
        let transforms: Api<crate::api::Transform> = Api::namespaced(self.client.clone(), &serving.transform_namespace);
        let live = transforms.get_opt(&serving.transform_name).await?;
        Ok(live.is_some_and(|t| t.uid().as_deref() == Some(serving.transform_uid.as_str())))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Prefix of every published serving's name.
const SERVING_PREFIX: &str = "pequod-serving-";

fn serving_selector() -> String {
    format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE},{SERVING_LABEL}")
}

/// The servings a replica follows.
#[derive(Default)]
struct Following {
    /// The Transform of each serving followed, by ConfigMap name.
    kinds: BTreeMap<String, TransformKey>,
    /// The Transform uid and stamp of the newest serving followed, by ConfigMap name.
    newest: BTreeMap<String, (String, i64)>,
}

/// Serves on this replica every kind the leader publishes, for the instances of the shards
/// this replica holds.
pub struct Followers {
    pub client: Client,
    pub namespace: String,
    pub key: GraphKey,
    pub renderer: Renderer,
    pub supervisor: Supervisor,
    pub shards: Arc<Shards>,
}

impl Followers {
    pub async fn run(self, shutdown: Shutdown) {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.namespace);
        let mut events = watcher(api, watcher::Config::default().labels(&serving_selector()))
            .default_backoff()
            .boxed();
        let mut held = self.shards.subscribe();
        held.mark_unchanged();
        // Servings followed, by ConfigMap name; those that failed wait for a retry.
        let mut followed = Following::default();
        let mut failed: BTreeMap<String, ConfigMap> = BTreeMap::new();
        let mut listed: Option<BTreeSet<String>> = None;
        let mut retry = tokio::time::interval(RETRY);
        loop {
            tokio::select! {
                () = shutdown.wait() => break,
                event = events.next() => match event {
                    Some(Ok(watcher::Event::Init)) => listed = Some(BTreeSet::new()),
                    Some(Ok(watcher::Event::InitApply(cm))) => {
                        if let Some(listed) = listed.as_mut() {
                            listed.insert(cm.name_any());
                        }
                        self.follow(cm, &mut followed, &mut failed).await;
                    }
                    Some(Ok(watcher::Event::InitDone)) => {
                        let listed = listed.take().unwrap_or_default();
                        failed.retain(|name, _| listed.contains(name));
                        let gone: Vec<String> = followed.kinds.keys().filter(|n| !listed.contains(*n)).cloned().collect();
                        for name in gone {
                            self.unfollow(&name, &mut followed, &mut failed).await;
                        }
                    }
                    Some(Ok(watcher::Event::Apply(cm))) => self.follow(cm, &mut followed, &mut failed).await,
                    Some(Ok(watcher::Event::Delete(cm))) => self.unfollow(&cm.name_any(), &mut followed, &mut failed).await,
                    Some(Err(e)) => tracing::warn!(error = %e, "watching the published servings failed; retrying"),
                    None => break,
                },
                Ok(()) = held.changed() => {
                    // The instances of the shards taken are listed, those of the shards given up
                    // forgotten.
                    held.mark_unchanged();
                    self.supervisor.restart_all().await;
                }
                _ = retry.tick(), if !failed.is_empty() => {
                    for cm in std::mem::take(&mut failed).into_values() {
                        self.follow(cm, &mut followed, &mut failed).await;
                    }
                }
            }
        }
    }

    async fn follow(&self, cm: ConfigMap, followed: &mut Following, failed: &mut BTreeMap<String, ConfigMap>) {
        let name = cm.name_any();
        failed.remove(&name);
        match self.followed(&cm, followed).await {
            Ok(spec) => {
                followed.kinds.insert(name, spec.transform.clone());
                self.supervisor.follow(spec).await;
            }
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, configmap = %name, "cannot serve the kind the leader published yet; trying again");
                failed.insert(name, cm);
            }
            Err(e) => tracing::warn!(error = %e, configmap = %name, "not serving a kind as published"),
        }
    }

    async fn unfollow(&self, name: &str, followed: &mut Following, failed: &mut BTreeMap<String, ConfigMap>) {
        failed.remove(name);
        if let Some(transform) = followed.kinds.remove(name)
            && let Err(e) = self.supervisor.stop(&transform).await
        {
            tracing::warn!(error = %e, %transform, "stopping a kind no longer published failed");
        }
    }

    /// The kind a published serving describes, with its modules loaded; never one older than
    /// a serving of the same Transform followed before.
    async fn followed(
        &self,
        cm: &ConfigMap,
        followed: &mut Following,
    ) -> Result<super::instance::Followed, ServingError> {
        let serving = from_config_map(cm, &self.key)?;
        let name = cm.name_any();
        let newest = (serving.transform_uid.clone(), serving.published_at);
        match followed.newest.get(&name) {
            Some((uid, at)) if *uid == newest.0 && *at > newest.1 => return Err(ServingError::Stale { name }),
            _ => {
                followed.newest.insert(name, newest);
            }
        }
        let allowance = Allowance::parse(&serving.allowance).ok_or_else(|| ServingError::Damaged {
            name: cm.name_any(),
            message: format!("unknown allowance {}", serving.allowance),
        })?;
        let target = self.module(&serving, &serving.target).await?;
        let current = match &serving.current {
            Some(digest) => Some(self.module(&serving, digest).await?),
            None => None,
        };
        // Versions instances stay on or are pinned to: one that cannot be loaded says so on
        // the instances that ask for it.
        for digest in &serving.served {
            if let Err(e) = self.module(&serving, digest).await {
                tracing::debug!(error = %e, %digest, "a module version served earlier is not published");
            }
        }
        Ok(super::instance::Followed {
            transform: serving.transform(),
            transform_uid: serving.transform_uid.clone(),
            resource: serving.resource(),
            namespace: serving.namespace.clone(),
            allowance,
            served: serving.served.clone(),
            selection: serving.selection(target, current),
        })
    }

    /// Module `digest` of the serving's Transform: from this replica's cache, or as published.
    async fn module(&self, serving: &Serving, digest: &str) -> Result<Module, ServingError> {
        if let Some(module) = self.renderer.find(digest, &serving.platform).await {
            return Ok(module);
        }
        let transform = (serving.transform_namespace.as_str(), serving.transform_name.as_str());
        let files = published::read(&self.client, &self.namespace, digest, transform)
            .await?
            .ok_or_else(|| ServingError::ModuleMissing {
                transform: serving.transform().to_string(),
                digest: digest.to_string(),
            })?;
        Ok(self.renderer.load(files, &serving.platform).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> GraphKey {
        GraphKey::new(&[7; 32]).unwrap()
    }

    fn serving() -> Serving {
        Serving {
            transform_namespace: "platform".into(),
            transform_name: "web".into(),
            transform_uid: "uid-1".into(),
            group: "apps.example.com".into(),
            version: "v1".into(),
            kind: "WebService".into(),
            plural: "webservices".into(),
            namespace: None,
            allowance: "namespace".into(),
            served: vec!["sha256:aa".into(), "sha256:bb".into()],
            platform: "web".into(),
            target: "sha256:bb".into(),
            current: Some("sha256:aa".into()),
            admitted: Some(BTreeSet::from(["team-a/one".to_string()])),
            pending: BTreeMap::from([("team-a/two".to_string(), "module sha256:bb: 1 updated".to_string())]),
            published_at: 0,
        }
    }

    #[test]
    fn a_serving_too_large_with_its_pending_lines_is_published_without_them() {
        let mut s = serving();
        // Random text does not compress: 8,000 lines of 256 bytes exceed the limit.
        let mut seed = 1u64;
        let mut noise = || {
            (0..256)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    char::from(b'a' + (seed >> 59) as u8 % 26)
                })
                .collect::<String>()
        };
        s.pending = (0..8000).map(|i| (format!("team-a/n{i}"), noise())).collect();
        let cm = to_config_map(&s, &key()).unwrap();
        let back = from_config_map(&cm, &key()).unwrap();
        assert!(back.pending.is_empty());
        assert_eq!(back.admitted, s.admitted);
        // Without pending lines to drop, too large is an error.
        s.pending.clear();
        s.admitted = Some((0..40_000).map(|_| format!("team-a/{}", noise())).collect());
        assert!(matches!(to_config_map(&s, &key()), Err(ServingError::TooLarge { .. })));
    }

    #[test]
    fn a_published_serving_reads_back_with_the_key_that_signed_it() {
        let cm = to_config_map(&serving(), &key()).unwrap();
        assert_eq!(cm.name_any(), config_map_name(&serving().transform()));
        assert_eq!(from_config_map(&cm, &key()).unwrap(), serving());
        let other = GraphKey::new(&[8; 32]).unwrap();
        assert!(matches!(
            from_config_map(&cm, &other),
            Err(ServingError::Unsigned { .. })
        ));
    }

    #[test]
    fn a_changed_or_moved_serving_is_refused() {
        let mut cm = to_config_map(&serving(), &key()).unwrap();
        let mut changed = serving();
        changed.allowance = "cluster".into();
        let forged = to_config_map(&changed, &GraphKey::new(&[9; 32]).unwrap()).unwrap();
        cm.binary_data = forged.binary_data.clone();
        assert!(matches!(
            from_config_map(&cm, &key()),
            Err(ServingError::Unsigned { .. })
        ));
        // Signed, but published under another Transform's name.
        let mut moved = to_config_map(&serving(), &key()).unwrap();
        moved.metadata.name = Some(config_map_name(&TransformKey {
            namespace: "platform".into(),
            name: "other".into(),
        }));
        assert!(matches!(
            from_config_map(&moved, &key()),
            Err(ServingError::Unsigned { .. })
        ));
    }

    #[test]
    fn the_selection_keys_round_trip() {
        let s = serving();
        let module = |digest: &str| Module {
            digest: digest.into(),
            package: "web".into(),
            platform: "web".into(),
            dir: "/nowhere".into(),
            has_metadata: false,
            has_status: false,
            has_versions: false,
            has_settings: false,
        };
        let selection = s.selection(module("sha256:bb"), Some(module("sha256:aa")));
        let one = key_of("team-a/one");
        assert!(selection.admission.admits(&one));
        assert!(!selection.admission.admits(&key_of("team-a/two")));
        let back = Serving::of(
            (&s.transform(), &s.transform_uid),
            &s.resource(),
            None,
            (Allowance::Namespace, &s.served),
            &selection,
        );
        assert_eq!(back, s);
        assert_eq!(s.resource().api_version, "apps.example.com/v1");
    }
}
