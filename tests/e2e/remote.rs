//! Remote modules against real components: OCI registries (distribution on loopback, one
//! open and one behind htpasswd) and git (`file://` and `git daemon`).

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use kube::api::{Patch, PatchParams};
use pequod::api::{Transform, TransformPhase};
use pequod::source::credentials::RegistryCredentials;
use serde_json::{Value, json};

use crate::support::instances::{apply_instance, config_data, wait_instance};
use crate::support::modules::labelled_module;
use crate::support::remote::{self, GitRepo, REGISTRY_PASSWORD, REGISTRY_USER};
use crate::support::transforms::{WAIT, apply_transform, condition, failed, group, setup, wait_condition};
use crate::support::{self, TEST_MANAGER, TestEnv, wait_events, wait_for};

/// A Transform spec serving the `type_` module at `reference`, in the test's own group.
fn remote_spec(env: &TestEnv, type_: &str, reference: &str, path: Option<&str>, secret: Option<&str>) -> Value {
    let mut cue_ref = json!({"type": type_, "ref": reference});
    if let Some(path) = path {
        cue_ref["path"] = json!(path);
    }
    if let Some(secret) = secret {
        cue_ref["pullSecretRef"] = json!({"name": secret});
    }
    json!({"cueRef": cue_ref, "group": group(env)})
}

const OPAQUE: &str = "Opaque";
const DOCKER_CONFIG: &str = "kubernetes.io/dockerconfigjson";
const SSH_AUTH: &str = "kubernetes.io/ssh-auth";

/// Creates or replaces Secret `name` in the test namespace with `string_data`, its tokens and
/// passwords bound to the loopback test servers.
async fn put_secret(env: &TestEnv, name: &str, type_: &str, string_data: Value) {
    put_secret_for(env, name, type_, string_data, Some("127.0.0.1")).await;
}

async fn put_secret_for(env: &TestEnv, name: &str, type_: &str, string_data: Value, hosts: Option<&str>) {
    let mut secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "type": type_, "stringData": string_data});
    if let Some(hosts) = hosts {
        secret["metadata"]["annotations"] = json!({"pequod.io/credential-hosts": hosts});
    }
    Api::<Secret>::namespaced(env.client.clone(), &env.namespace)
        .patch(name, &PatchParams::apply(TEST_MANAGER).force(), &Patch::Apply(secret))
        .await
        .unwrap();
}

async fn wait_digest(transforms: &Api<Transform>, name: &str, digest: &str) -> Transform {
    wait_for(&format!("Transform {name} at {digest}"), WAIT, || async {
        let t = transforms.get(name).await.map_err(|e| e.to_string())?;
        let resolved = t
            .status
            .as_ref()
            .and_then(|s| s.resolved_cue_ref.as_ref())
            .map(|r| r.digest.clone());
        match resolved {
            Some(d) if d == digest && condition(&t, "Ready").is_some_and(|c| c.is_true()) => Ok(t),
            other => Err(format!(
                "{other:?}; conditions {:?}",
                t.status.as_ref().map(|s| &s.conditions)
            )),
        }
    })
    .await
}

#[tokio::test]
async fn an_oci_module_serves_its_kind_and_a_moved_tag_rolls_instances_forward() {
    let (env, transforms) = setup("oci-tag").await;
    let registry = &remote::shared_registries().open;
    let repository = format!("platforms/{}", env.namespace);
    let v1 = remote::publish(
        registry,
        &repository,
        "stable",
        &labelled_module("Memo", "1"),
        &RegistryCredentials::Anonymous,
    )
    .await;
    apply_transform(
        &transforms,
        "memo",
        remote_spec(&env, "oci", &format!("{registry}/{repository}:stable"), None, None),
    )
    .await;
    let t = wait_digest(&transforms, "memo", &v1).await;
    let fetched = condition(&t, "CueFetched").unwrap();
    assert!(fetched.message.contains(&v1), "{}", fetched.message);

    let api_version = format!("{}/v1alpha1", group(&env));
    let memos = support::dynamic_api(&env.client, &api_version, "Memo", &env.namespace).await;
    apply_instance(&memos, &api_version, "Memo", "a", json!({"text": "hello"})).await;
    wait_instance(&memos, "a", "Ready", "True", "Ready").await;
    let data = config_data(&env.client, &env.namespace, "memo-a").await.unwrap();
    assert_eq!(data["version"], "1");

    // The tag moves to a version with a new optional field: the next poll resolves it, rolls
    // the CRD forward and renders every instance again.
    let with_color =
        |version: &str| labelled_module("Memo", version).replace("text: string", "text: string\n\tcolor?: string");
    let v2 = remote::publish(
        registry,
        &repository,
        "stable",
        &with_color("2"),
        &RegistryCredentials::Anonymous,
    )
    .await;
    assert_ne!(v1, v2);
    wait_digest(&transforms, "memo", &v2).await;
    wait_for("memo-a at version 2", WAIT, || async {
        match config_data(&env.client, &env.namespace, "memo-a").await {
            Some(d) if d.get("version").map(String::as_str) == Some("2") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let crd = Api::<CustomResourceDefinition>::all(env.client.clone())
        .get(&format!("memos.{}", group(&env)))
        .await
        .unwrap();
    let schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
    assert!(
        schema
            .pointer("/openAPIV3Schema/properties/spec/properties/color")
            .is_some(),
        "{schema}"
    );

    // A digest reference never moves, whatever the tag does.
    let pinned = format!("{registry}/{repository}@{v2}");
    apply_transform(&transforms, "memo", remote_spec(&env, "oci", &pinned, None, None)).await;
    wait_digest(&transforms, "memo", &v2).await;
    remote::publish(
        registry,
        &repository,
        "stable",
        &with_color("3"),
        &RegistryCredentials::Anonymous,
    )
    .await;
    // A new generation is certain to be reconciled (and fetched) again.
    apply_transform(&transforms, "memo", {
        let mut spec = remote_spec(&env, "oci", &pinned, None, None);
        spec["categories"] = json!(["memos"]);
        spec
    })
    .await;
    let t = wait_for("the new generation reconciled", WAIT, || async {
        let t = transforms.get("memo").await.map_err(|e| e.to_string())?;
        let status = t.status.clone().unwrap_or_default();
        if status.observed_generation == t.metadata.generation && condition(&t, "Ready").is_some_and(|c| c.is_true()) {
            Ok(t)
        } else {
            Err(format!("{status:?}"))
        }
    })
    .await;
    assert_eq!(t.status.unwrap().resolved_cue_ref.unwrap().digest, v2);
    let data = config_data(&env.client, &env.namespace, "memo-a").await.unwrap();
    assert_eq!(data["version"], "2");
    env.cleanup().await;
}

#[tokio::test]
async fn cue_module_artifacts_and_missing_tags() {
    let (env, transforms) = setup("oci-cue-layout").await;
    let registry = &remote::shared_registries().open;
    let repository = format!("cue/{}", env.namespace);
    let module = labelled_module("Card", "1");
    let digest = remote::publish_cue_module(
        registry,
        &repository,
        "v0.1.0",
        &[("card.cue", &module), ("README.md", "docs")],
    )
    .await;
    apply_transform(
        &transforms,
        "card",
        remote_spec(&env, "oci", &format!("{registry}/{repository}:v0.1.0"), None, None),
    )
    .await;
    wait_digest(&transforms, "card", &digest).await;

    apply_transform(
        &transforms,
        "missing",
        remote_spec(&env, "oci", &format!("{registry}/{repository}:v9.9.9"), None, None),
    )
    .await;
    let (t, message) = failed(&transforms, "missing", "CueFetched", "CueFetchFailed").await;
    assert!(
        message.contains("v9.9.9") && message.to_lowercase().contains("manifest unknown"),
        "{message}"
    );
    assert_eq!(t.status.as_ref().unwrap().phase, Some(TransformPhase::Failed));
    wait_events(&env.client, &env.namespace, "missing", &["CueFetchFailed"]).await;

    // An artifact whose layers are larger than any module is not pulled into memory.
    let huge = remote::publish_layers(
        registry,
        &repository,
        "huge",
        vec![(vec![0u8; 17 * 1024 * 1024], pequod::source::oci::TAR)],
    )
    .await;
    assert!(huge.starts_with("sha256:"));
    apply_transform(
        &transforms,
        "huge",
        remote_spec(&env, "oci", &format!("{registry}/{repository}:huge"), None, None),
    )
    .await;
    let (_, message) = failed(&transforms, "huge", "CueFetched", "CueFetchFailed").await;
    assert!(message.contains("bytes in all"), "{message}");

    // A zip bomb: a few kilobytes that expand to 32 MiB. Reading stops at the module limit.
    let bomb_file = "x".repeat(32 * 1024 * 1024);
    let bomb = remote::publish_cue_module(registry, &repository, "bomb", &[("bomb.cue", &bomb_file)]).await;
    assert!(bomb.starts_with("sha256:"));
    apply_transform(
        &transforms,
        "bomb",
        remote_spec(&env, "oci", &format!("{registry}/{repository}:bomb"), None, None),
    )
    .await;
    let (_, message) = failed(&transforms, "bomb", "CueFetched", "InvalidModule").await;
    assert!(message.contains("at most 1048576"), "{message}");

    // References that cannot work are named without asking any server.
    apply_transform(
        &transforms,
        "bad-ref",
        remote_spec(&env, "oci", "webservice:v1", None, None),
    )
    .await;
    let (_, message) = failed(&transforms, "bad-ref", "CueFetched", "InvalidReference").await;
    assert!(message.contains("name the registry host"), "{message}");
    wait_events(&env.client, &env.namespace, "bad-ref", &["CueFetchFailed"]).await;
    apply_transform(
        &transforms,
        "bad-path",
        remote_spec(
            &env,
            "git",
            "https://git.example.com/org/platforms.git",
            Some("../etc"),
            None,
        ),
    )
    .await;
    let (_, message) = failed(&transforms, "bad-path", "CueFetched", "InvalidReference").await;
    assert!(message.contains("without '..'"), "{message}");
    env.cleanup().await;
}

#[tokio::test]
async fn a_private_registry_needs_the_pull_secret() {
    let (env, transforms) = setup("oci-private").await;
    let registry = &remote::shared_registries().private;
    let repository = format!("private/{}", env.namespace);
    let credentials = RegistryCredentials::Basic {
        username: REGISTRY_USER.into(),
        password: REGISTRY_PASSWORD.into(),
    };
    let digest = remote::publish(
        registry,
        &repository,
        "v1",
        &labelled_module("Vault", "1"),
        &credentials,
    )
    .await;
    let reference = format!("{registry}/{repository}:v1");

    apply_transform(&transforms, "vault", remote_spec(&env, "oci", &reference, None, None)).await;
    let (_, message) = failed(&transforms, "vault", "CueFetched", "CueFetchFailed").await;
    assert!(message.contains("Not authorized"), "{message}");

    // A Secret that names the registry but with a wrong password fails as clearly.
    let docker_config = |password: &str| {
        let auth = base64_encode(&format!("{REGISTRY_USER}:{password}"));
        json!({".dockerconfigjson": json!({"auths": {registry.as_str(): {"auth": auth}}}).to_string()})
    };
    put_secret(&env, "pull", DOCKER_CONFIG, docker_config("wrong")).await;
    apply_transform(
        &transforms,
        "vault",
        remote_spec(&env, "oci", &reference, None, Some("pull")),
    )
    .await;
    wait_for("a failure with the wrong password", WAIT, || async {
        let t = transforms.get("vault").await.map_err(|e| e.to_string())?;
        let done = t.status.as_ref().and_then(|s| s.observed_generation) == t.metadata.generation
            && condition(&t, "CueFetched").is_some_and(|c| !c.is_true());
        if done { Ok(()) } else { Err(format!("{:?}", t.status)) }
    })
    .await;

    put_secret(&env, "pull", DOCKER_CONFIG, docker_config(REGISTRY_PASSWORD)).await;
    // The failed fetch is retried with backoff; the corrected Secret is picked up by it.
    wait_digest(&transforms, "vault", &digest).await;

    // A Secret that does not exist is named.
    apply_transform(
        &transforms,
        "vault",
        remote_spec(&env, "oci", &reference, None, Some("absent")),
    )
    .await;
    let (_, message) = failed(&transforms, "vault", "CueFetched", "PullSecretInvalid").await;
    assert!(message.contains("absent"), "{message}");
    env.cleanup().await;
}

fn base64_encode(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(text)
}

#[tokio::test]
async fn git_modules_come_from_a_folder_at_a_branch_tag_or_commit() {
    let (env, transforms) = setup("git-module").await;
    let server = remote::git_server();
    let repo = GitRepo::new_in(&server.base);
    let first = repo.commit(
        &[
            ("platforms/tile/tile.cue", &labelled_module("Tile", "1")),
            ("README.md", "platforms"),
        ],
        "tile v1",
    );
    repo.git(&["tag", "-a", "v1", "-m", "v1"]);
    let git_url = format!("{}/{}", server.url, repo.name());

    apply_transform(
        &transforms,
        "tile",
        remote_spec(&env, "git", &format!("{git_url}?ref=v1"), Some("platforms/tile"), None),
    )
    .await;
    wait_digest(&transforms, "tile", &first).await;
    let api_version = format!("{}/v1alpha1", group(&env));
    let tiles = support::dynamic_api(&env.client, &api_version, "Tile", &env.namespace).await;
    apply_instance(&tiles, &api_version, "Tile", "t", json!({"text": "x"})).await;
    wait_instance(&tiles, "t", "Ready", "True", "Ready").await;

    // A branch follows new commits; file:// works as well as git://.
    let second = repo.commit(&[("platforms/tile/tile.cue", &labelled_module("Tile", "2"))], "tile v2");
    apply_transform(
        &transforms,
        "tile",
        remote_spec(
            &env,
            "git",
            &format!("{}?ref=main", repo.file_url()),
            Some("platforms/tile"),
            None,
        ),
    )
    .await;
    wait_digest(&transforms, "tile", &second).await;
    wait_for("tile-t at version 2", WAIT, || async {
        match config_data(&env.client, &env.namespace, "tile-t").await {
            Some(d) if d.get("version").map(String::as_str) == Some("2") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // A pinned commit.
    apply_transform(
        &transforms,
        "tile",
        remote_spec(
            &env,
            "git",
            &format!("{git_url}?ref={first}"),
            Some("platforms/tile"),
            None,
        ),
    )
    .await;
    wait_digest(&transforms, "tile", &first).await;

    // A folder without .cue files and an unknown branch are named.
    apply_transform(
        &transforms,
        "tile",
        remote_spec(
            &env,
            "git",
            &format!("{git_url}?ref=main"),
            Some("platforms/none"),
            None,
        ),
    )
    .await;
    let (_, message) = failed(&transforms, "tile", "CueFetched", "InvalidModule").await;
    assert!(
        message.contains("platforms/none") && message.contains("platforms/tile"),
        "{message}"
    );
    apply_transform(
        &transforms,
        "tile",
        remote_spec(
            &env,
            "git",
            &format!("{git_url}?ref=nope"),
            Some("platforms/tile"),
            None,
        ),
    )
    .await;
    let (_, message) = failed(&transforms, "tile", "CueFetched", "CueFetchFailed").await;
    assert!(message.contains("no branch or tag nope"), "{message}");
    // The kind stays served with the last good module meanwhile.
    assert!(message.contains("keep being served"), "{message}");
    wait_instance(&tiles, "t", "Ready", "True", "Ready").await;
    env.cleanup().await;
}

#[tokio::test]
async fn the_registry_token_flow_works_anonymously_and_with_credentials() {
    let (env, transforms) = setup("oci-token").await;
    let registry = &remote::shared_registries().token;
    let credentials = RegistryCredentials::Basic {
        username: REGISTRY_USER.into(),
        password: REGISTRY_PASSWORD.into(),
    };
    // Pushing goes through the token flow with credentials.
    let public = format!("public/{}", env.namespace);
    let private = format!("team/{}", env.namespace);
    let public_digest = remote::publish(registry, &public, "v1", &labelled_module("Leaf", "1"), &credentials).await;
    let private_digest = remote::publish(registry, &private, "v1", &labelled_module("Bark", "1"), &credentials).await;

    // An anonymous token may pull public repositories.
    apply_transform(
        &transforms,
        "leaf",
        remote_spec(&env, "oci", &format!("{registry}/{public}:v1"), None, None),
    )
    .await;
    wait_digest(&transforms, "leaf", &public_digest).await;

    // Not private ones; a Secret with username and password gets a token that may.
    apply_transform(
        &transforms,
        "bark",
        remote_spec(&env, "oci", &format!("{registry}/{private}:v1"), None, None),
    )
    .await;
    let (_, message) = failed(&transforms, "bark", "CueFetched", "CueFetchFailed").await;
    assert!(message.contains("Not authorized"), "{message}");
    // A password whose Secret does not name the registry is not sent to it.
    put_secret_for(
        &env,
        "unbound",
        OPAQUE,
        json!({"username": REGISTRY_USER, "password": REGISTRY_PASSWORD}),
        None,
    )
    .await;
    apply_transform(
        &transforms,
        "bark",
        remote_spec(&env, "oci", &format!("{registry}/{private}:v1"), None, Some("unbound")),
    )
    .await;
    let (_, message) = failed(&transforms, "bark", "CueFetched", "PullSecretInvalid").await;
    assert!(message.contains("pequod.io/credential-hosts"), "{message}");
    put_secret(
        &env,
        "registry",
        OPAQUE,
        json!({"username": REGISTRY_USER, "password": REGISTRY_PASSWORD}),
    )
    .await;
    apply_transform(
        &transforms,
        "bark",
        remote_spec(&env, "oci", &format!("{registry}/{private}:v1"), None, Some("registry")),
    )
    .await;
    wait_digest(&transforms, "bark", &private_digest).await;
    env.cleanup().await;
}

#[tokio::test]
async fn git_over_https_takes_a_token_or_a_username_and_password() {
    let (env, transforms) = setup("git-auth").await;
    let repo = GitRepo::new_in(&remote::git_server().base);
    let commit = repo.commit(&[("stone.cue", &labelled_module("Stone", "1"))], "stone");
    let url = format!("{}/{}?ref=main", remote::git_http_server(), repo.name());

    apply_transform(&transforms, "stone", remote_spec(&env, "git", &url, None, None)).await;
    let (_, message) = failed(&transforms, "stone", "CueFetched", "CueFetchFailed").await;
    assert!(
        message.contains("git ls-remote") && !message.contains(remote::GIT_TOKEN),
        "{message}"
    );

    put_secret(&env, "token", OPAQUE, json!({"token": remote::GIT_TOKEN})).await;
    apply_transform(
        &transforms,
        "stone",
        remote_spec(&env, "git", &url, None, Some("token")),
    )
    .await;
    wait_digest(&transforms, "stone", &commit).await;

    put_secret(
        &env,
        "basic",
        OPAQUE,
        json!({"username": REGISTRY_USER, "password": REGISTRY_PASSWORD}),
    )
    .await;
    let second = repo.commit(&[("stone.cue", &labelled_module("Stone", "2"))], "stone v2");
    apply_transform(
        &transforms,
        "stone",
        remote_spec(&env, "git", &url, None, Some("basic")),
    )
    .await;
    wait_digest(&transforms, "stone", &second).await;
    env.cleanup().await;
}

#[tokio::test]
async fn git_over_ssh_takes_a_key_and_checks_the_host() {
    let (env, transforms) = setup("git-ssh").await;
    let server = remote::ssh_server();
    let repo = GitRepo::new_in(&remote::git_server().base);
    let commit = repo.commit(&[("pebble.cue", &labelled_module("Pebble", "1"))], "pebble");
    let url = format!(
        "ssh://{}@{}{}?ref=main",
        server.user,
        server.addr,
        repo.path().display()
    );
    let ssh_key = |known_hosts: &str| json!({"ssh-privatekey": server.private_key, "known_hosts": known_hosts});
    let spec = remote_spec(&env, "git", &url, None, Some("ssh"));

    // A host key that does not match is refused: no connection to an unknown server.
    let wrong_host = format!("[127.0.0.1]:1 {}", server.known_hosts.split_once(' ').unwrap().1);
    put_secret(&env, "ssh", SSH_AUTH, ssh_key(&wrong_host)).await;
    apply_transform(&transforms, "pebble", spec.clone()).await;
    let (_, message) = failed(&transforms, "pebble", "CueFetched", "CueFetchFailed").await;
    assert!(message.contains("Host key verification failed"), "{message}");

    put_secret(&env, "ssh", SSH_AUTH, ssh_key(&server.known_hosts)).await;
    wait_digest(&transforms, "pebble", &commit).await;
    env.cleanup().await;
}

#[tokio::test]
async fn pequod_publish_pushes_a_module_folder_that_a_transform_serves() {
    let (env, transforms) = setup("oci-publish").await;
    let registry = &remote::shared_registries().private;
    let module = tempfile::tempdir().unwrap();
    std::fs::write(module.path().join("shell.cue"), labelled_module("Shell", "1")).unwrap();
    let reference = format!("{registry}/published/{}:v1", env.namespace);
    let publish = |password: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_pequod"))
            .args(["publish", "--insecure", "--module"])
            .arg(module.path())
            .arg(&reference)
            .env("PEQUOD_REGISTRY_USERNAME", REGISTRY_USER)
            .env("PEQUOD_REGISTRY_PASSWORD", password)
            .output()
            .unwrap()
    };
    let refused = publish("wrong");
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("UNAUTHORIZED"),
        "{refused:?}"
    );

    let out = publish(REGISTRY_PASSWORD);
    assert!(out.status.success(), "{out:?}");
    let printed = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let (repository, digest) = printed.split_once('@').unwrap();
    assert_eq!(repository, format!("{registry}/published/{}", env.namespace));

    put_secret(
        &env,
        "registry",
        OPAQUE,
        json!({"username": REGISTRY_USER, "password": REGISTRY_PASSWORD}),
    )
    .await;
    apply_transform(
        &transforms,
        "shell",
        remote_spec(&env, "oci", &printed, None, Some("registry")),
    )
    .await;
    wait_digest(&transforms, "shell", digest).await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_broken_module_under_a_tag_is_replaced_by_pushing_a_fixed_one() {
    let (env, transforms) = setup("oci-fixed-tag").await;
    let registry = &remote::shared_registries().open;
    let repository = format!("platforms/{}", env.namespace);
    let anonymous = RegistryCredentials::Anonymous;
    let broken = labelled_module("Plank", "1").replace("#Input: {", "#Input: {\n\tcount: int & \"text\"");
    remote::publish(registry, &repository, "v1", &broken, &anonymous).await;
    let reference = format!("{registry}/{repository}:v1");
    apply_transform(&transforms, "plank", remote_spec(&env, "oci", &reference, None, None)).await;
    wait_condition(&transforms, "plank", "SchemaExtracted", false, "InvalidModule").await;

    // The Transform is not touched: the tag is looked at again and the fix is found.
    let fixed = remote::publish(registry, &repository, "v1", &labelled_module("Plank", "1"), &anonymous).await;
    wait_digest(&transforms, "plank", &fixed).await;
    env.cleanup().await;
}
