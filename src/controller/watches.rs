//! One shared watch per kind of applied object, with a cache of the objects Pequod labelled.
//!
//! Every ResourceGraph that applies a Deployment shares the one Deployment watch. An event on
//! an object triggers a reconcile of the graph its labels name, which is how drift is noticed
//! and readiness progresses without polling.

use crate::api::names::{GRAPH_LABEL, GRAPH_NAMESPACE_LABEL};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use kube::api::DynamicObject;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::mpsc;

use crate::api::ResourceGraph;
use crate::apply::Resolved;
use crate::runtime::shutdown::Shutdown;

struct KindWatch {
    store: Store<DynamicObject>,
    synced: Arc<AtomicBool>,
}

/// The object caches, one per kind, started on first use.
pub struct ObjectWatches {
    client: Client,
    trigger: mpsc::UnboundedSender<ObjectRef<ResourceGraph>>,
    kinds: Mutex<HashMap<String, KindWatch>>,
    shutdown: Shutdown,
}

/// What the cache knows of an object.
pub enum Lookup {
    /// The cache has listed the kind: the object, or None when absent.
    Known(Option<Arc<DynamicObject>>),
    /// The watch has not finished its first list; ask the apiserver.
    Unknown,
}

impl ObjectWatches {
    /// The watches and the stream of graphs to reconcile because one of their objects changed.
    pub fn new(client: Client, shutdown: Shutdown) -> (Arc<Self>, mpsc::UnboundedReceiver<ObjectRef<ResourceGraph>>) {
        let (trigger, triggers) = mpsc::unbounded_channel();
        (
            Arc::new(Self {
                client,
                trigger,
                kinds: Mutex::default(),
                shutdown,
            }),
            triggers,
        )
    }

    /// Looks an object up in its kind's cache, starting the kind's watch if needed.
    pub fn lookup(&self, resolved: &Resolved, namespace: Option<&str>, name: &str) -> Lookup {
        let mut kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        let watch = kinds.entry(resolved.key()).or_insert_with(|| self.start(resolved));
        if !watch.synced.load(Ordering::Acquire) {
            return Lookup::Unknown;
        }
        let mut key = ObjectRef::<DynamicObject>::new_with(name, resolved.resource.clone());
        if resolved.namespaced {
            key = key.within(namespace.unwrap_or_default());
        }
        Lookup::Known(watch.store.get(&key))
    }

    fn start(&self, resolved: &Resolved) -> KindWatch {
        let writer = reflector::store::Writer::new(resolved.resource.clone());
        let store = writer.as_reader();
        let synced = Arc::new(AtomicBool::new(false));
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &resolved.resource);
        // Only objects Pequod applied: the label selector keeps the cache small.
        let config = watcher::Config::default().labels(GRAPH_LABEL);
        let trigger = self.trigger.clone();
        let synced_flag = synced.clone();
        let kind = resolved.key();
        let shutdown = self.shutdown.clone();
        let events = watcher(api, config)
            .default_backoff()
            .reflect(writer)
            .for_each(move |event| {
                match event {
                    Ok(watcher::Event::InitDone) => synced_flag.store(true, Ordering::Release),
                    Ok(watcher::Event::Apply(obj) | watcher::Event::Delete(obj)) => {
                        if let Some(graph) = owning_graph(&obj) {
                            let _ = trigger.send(graph);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => tracing::debug!(%kind, error = %e, "watch of applied objects failed; retrying"),
                }
                futures::future::ready(())
            });
        tokio::spawn(async move {
            tokio::select! {
                _ = events => {}
                _ = shutdown.wait() => {}
            }
        });
        KindWatch { store, synced }
    }
}

/// The graph an object's labels name.
fn owning_graph(obj: &DynamicObject) -> Option<ObjectRef<ResourceGraph>> {
    let labels = obj.metadata.labels.as_ref()?;
    let name = labels.get(GRAPH_LABEL)?;
    let namespace = labels.get(GRAPH_NAMESPACE_LABEL).or(obj.metadata.namespace.as_ref())?;
    Some(ObjectRef::new(name).within(namespace))
}
