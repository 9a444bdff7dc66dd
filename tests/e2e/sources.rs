//! Module sources that live in the cluster.

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{Patch, PatchParams};
use pequod::api::{CueRef, CueRefType};
use pequod::error::ErrorCategory;
use std::sync::Arc;

use pequod::metrics::Metrics;
use pequod::source::{Fetcher, FetcherConfig, SourceError};
use serde_json::json;

use crate::support::{self, TEST_MANAGER};

fn fetcher(client: &kube::Client) -> Fetcher {
    let cache = std::env::temp_dir().join(format!("pequod-sources-{}", std::process::id()));
    Fetcher::new(
        client.clone(),
        FetcherConfig::new(cache),
        Arc::new(Metrics::new().unwrap()),
    )
}

fn configmap_ref(name: &str) -> CueRef {
    CueRef {
        type_: CueRefType::Configmap,
        ref_: name.into(),
        path: None,
        pull_secret_ref: None,
    }
}

async fn put(api: &Api<ConfigMap>, name: &str, labelled: bool, data: serde_json::Value) {
    let labels = if labelled {
        json!({"pequod.io/cue-module": "true"})
    } else {
        json!({})
    };
    let cm =
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "labels": labels}, "data": data});
    api.patch(name, &PatchParams::apply(TEST_MANAGER).force(), &Patch::Apply(cm))
        .await
        .unwrap();
}

#[tokio::test]
async fn configmap_modules_are_read_and_their_digest_follows_edits() {
    let env = support::env("configmap-source").await;
    let api: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.namespace);
    put(&api, "module", true, json!({"input.cue": "package m\n#Input: {a: int}\n", "render.cue": "package m\n#Render: {input: _, output: nodes: []}\n", "README.md": "not cue"})).await;

    let fetched = fetcher(&env.client)
        .fetch(&configmap_ref("module"), &env.namespace, "t")
        .await
        .unwrap();
    assert_eq!(fetched.platform, "module");
    assert_eq!(
        fetched.files.files().keys().collect::<Vec<_>>(),
        ["input.cue", "render.cue"]
    );
    let first = fetched.files.digest();

    put(&api, "module", true, json!({"input.cue": "package m\n#Input: {a: int, b?: string}\n", "render.cue": "package m\n#Render: {input: _, output: nodes: []}\n"})).await;
    let edited = fetcher(&env.client)
        .fetch(&configmap_ref("module"), &env.namespace, "t")
        .await
        .unwrap();
    assert_ne!(edited.files.digest(), first);

    // Unchanged content (a label edit, say) keeps the digest.
    let again = fetcher(&env.client)
        .fetch(&configmap_ref("module"), &env.namespace, "t")
        .await
        .unwrap();
    assert_eq!(again.files.digest(), edited.files.digest());
    env.cleanup().await;
}

#[tokio::test]
async fn configmap_problems_are_named() {
    let env = support::env("configmap-errors").await;
    let api: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.namespace);

    let err = fetcher(&env.client)
        .fetch(&configmap_ref("absent"), &env.namespace, "t")
        .await
        .unwrap_err();
    assert!(matches!(err, SourceError::ConfigMapNotFound { .. }), "{err}");
    assert_eq!(err.reason(), "CueFetchFailed");
    assert!(err.to_string().contains(&format!("{}/absent", env.namespace)));

    put(&api, "unlabelled", false, json!({"a.cue": "package a"})).await;
    let err = fetcher(&env.client)
        .fetch(&configmap_ref("unlabelled"), &env.namespace, "t")
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("is not labelled pequod.io/cue-module=\"true\""),
        "{err}"
    );

    put(&api, "empty", true, json!({"notes.txt": "no cue here"})).await;
    let err = fetcher(&env.client)
        .fetch(&configmap_ref("empty"), &env.namespace, "t")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no .cue files"), "{err}");

    let git = CueRef {
        type_: CueRefType::Git,
        ref_: "example.com/x.git".into(),
        path: None,
        pull_secret_ref: None,
    };
    let err = fetcher(&env.client).fetch(&git, &env.namespace, "t").await.unwrap_err();
    assert_eq!(err.reason(), "InvalidReference");
    assert!(err.to_string().contains("expected a repository URL"), "{err}");
    env.cleanup().await;
}

#[tokio::test]
async fn local_plain_text_and_link_local_git_sources_are_refused_unless_allowed() {
    let env = support::env("source-policy").await;
    let fetcher = fetcher(&env.client);
    for reference in [
        "file:///etc",
        "git://127.0.0.1:9/platforms",
        "http://127.0.0.1:9/platforms",
        "https://169.254.169.254/latest",
        // 169.254.169.254 in a form only the system resolver reads.
        "https://2852039166/latest",
        // ... and in the IPv6 forms that carry it.
        "https://[::ffff:169.254.169.254]/latest",
        "https://[64:ff9b::a9fe:a9fe]/latest",
        "git@[::ffff:a9fe:a9fe]:platforms",
        "ssh://git@0xA9.0xFE.0xA9.0xFE/platforms",
    ] {
        let cue_ref = CueRef {
            type_: CueRefType::Git,
            ref_: reference.into(),
            path: None,
            pull_secret_ref: None,
        };
        let error = fetcher.fetch(&cue_ref, &env.namespace, "t").await.unwrap_err();
        assert_eq!(error.reason(), "SourceNotAllowed", "{reference}: {error}");
    }
    let registry_by_number = CueRef {
        type_: CueRefType::Oci,
        ref_: "0xa9fea9fe:443/platform/webservice:v1".into(),
        path: None,
        pull_secret_ref: None,
    };
    let error = fetcher
        .fetch(&registry_by_number, &env.namespace, "t")
        .await
        .unwrap_err();
    assert_eq!(error.reason(), "SourceNotAllowed", "{error}");
    assert!(error.to_string().contains("169.254.169.254"), "{error}");
    env.cleanup().await;
}
