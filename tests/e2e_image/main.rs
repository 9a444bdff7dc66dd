//! The operator image as users get it: built by `make image` (hack/image.sh), pushed to a
//! registry on loopback, pulled back by digest and unpacked, then its own `pequod`, run from its
//! own root filesystem as uid 65532 with the restricted install's service account, serves a
//! module from git over ssh and one from an OCI registry over HTTPS (the image's cue, git, ssh
//! and CA bundle), becomes Ready and answers on /metrics. The image's configuration and files
//! are checked against the Dockerfile, the other builder of the same image.
//! A test binary of its own: it installs `config/restricted`, which replaces the manager role.

use pequod_testkit as support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::DynamicObject;
use serde_json::{Value, json};
use support::{remote, restricted};

const WAIT: Duration = Duration::from_secs(120);
/// The image's size target: the base, the operator and cue, uncompressed.
const MAX_IMAGE_BYTES: u64 = 150 * 1000 * 1000;
const IMAGE_USER: &str = "65532:65532";

/// What the Dockerfile's final stage declares.
#[derive(Debug, Default)]
struct Definition {
    env: Vec<String>,
    user: String,
    entrypoint: Vec<String>,
    /// Destinations of its COPY instructions.
    files: Vec<String>,
}

fn dockerfile_definition() -> Definition {
    let text = std::fs::read_to_string(support::repo_root().join("Dockerfile")).unwrap();
    // Comment lines inside a continued instruction are dropped before the lines are joined.
    let joined = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("\\\n", " ");
    let last_stage = &joined[joined.rfind("\nFROM ").unwrap()..];
    let mut definition = Definition::default();
    for line in last_stage.lines().map(str::trim) {
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        match word {
            "ENV" => definition.env.extend(rest.split_whitespace().map(String::from)),
            "USER" => definition.user = rest.trim().to_string(),
            "ENTRYPOINT" => definition.entrypoint = serde_json::from_str(rest).unwrap(),
            "COPY" => definition
                .files
                .push(rest.split_whitespace().last().unwrap().to_string()),
            _ => {}
        }
    }
    definition
}

fn run(command: &mut Command) -> String {
    let out = command.output().unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Builds the image with hack/image.sh, pushes it to `registry`; returns its digest.
fn build_and_push(registry: &str) -> String {
    let started = std::time::Instant::now();
    let root = support::repo_root();
    run(Command::new(root.join("hack/image.sh"))
        .env("IMG", format!("{registry}/pequod:test"))
        .env("PEQUOD_IMAGE_TLS_VERIFY", "false"));
    eprintln!("image: built and pushed in {:.0} s", started.elapsed().as_secs_f64());
    let digest = std::fs::read_to_string(root.join("target/image/digest")).unwrap();
    assert!(digest.starts_with("sha256:"), "{digest}");
    digest.trim().to_string()
}

/// Pulls `registry/pequod@digest` with skopeo into an OCI layout and unpacks its layers into
/// `rootfs`, as a container runtime would; returns the image configuration.
fn pull_and_unpack(registry: &str, digest: &str, dir: &Path, rootfs: &Path) -> Value {
    let layout = dir.join("layout");
    run(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        &format!("docker://{registry}/pequod@{digest}"),
        &format!("oci:{}:pulled", layout.display()),
    ]));
    let blob = |digest: &str| layout.join("blobs/sha256").join(digest.trim_start_matches("sha256:"));
    let read_json = |path: PathBuf| -> Value { serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap() };
    let index = read_json(layout.join("index.json"));
    let manifest_digest = index["manifests"][0]["digest"].as_str().unwrap();
    assert_eq!(manifest_digest, digest, "the pulled manifest is the pushed one");
    let manifest = read_json(blob(manifest_digest));
    std::fs::create_dir_all(rootfs).unwrap();
    for layer in manifest["layers"].as_array().unwrap() {
        let media_type = layer["mediaType"].as_str().unwrap();
        assert!(
            media_type.ends_with("tar+gzip") || media_type.ends_with("tar"),
            "{media_type}"
        );
        run(Command::new("tar")
            .args(["--extract", "--numeric-owner", "--same-permissions", "--file"])
            .arg(blob(layer["digest"].as_str().unwrap()))
            .arg("--directory")
            .arg(rootfs));
    }
    read_json(blob(manifest["config"]["digest"].as_str().unwrap()))
}

/// Bytes of the regular files under `path`, each hard-linked file once.
fn size_of(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let meta = match std::fs::symlink_metadata(&dir) {
            Ok(meta) => meta,
            Err(_) => continue,
        };
        if meta.is_dir() {
            stack.extend(std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()));
        } else if meta.is_file() && seen.insert(meta.ino()) {
            total += meta.len();
        }
    }
    total
}

fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// A TLS registry over the storage of `plain` (a second server on the same folder), with a
/// certificate for 127.0.0.1 from a CA of the test's own; returns its address and the CA.
fn tls_registry(plain: &remote::Registry, dir: &Path) -> (String, String) {
    let mut ca_params = rcgen::CertificateParams::new(Vec::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "pequod image test CA");
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::IpAddress([127, 0, 0, 1].into())];
    let key = rcgen::KeyPair::generate().unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let cert = params.signed_by(&key, &issuer).unwrap();
    std::fs::write(dir.join("tls.crt"), cert.pem()).unwrap();
    std::fs::write(dir.join("tls.key"), key.serialize_pem()).unwrap();
    let port = support::free_port();
    let config = dir.join("tls-registry.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: pequod-test\n  tls:\n    certificate: {}\n    key: {}\n",
            plain.storage().display(),
            dir.join("tls.crt").display(),
            dir.join("tls.key").display()
        ),
    )
    .unwrap();
    support::control_plane::shared().spawn_process(
        "tls-registry",
        &remote::registry_binary(),
        &["serve".into(), config.display().to_string()],
        &[],
    );
    let addr = format!("127.0.0.1:{port}");
    remote::wait_listening(&addr, "the TLS registry");
    (addr, ca.pem())
}

/// A module of kind `kind` whose instance is one ConfigMap holding its `value`.
fn module(kind: &str) -> String {
    format!(
        r#"package m

#Metadata: kind: "{kind}"

#Input: {{
	value: string
}}

#Render: {{
	input: {{metadata: {{name: string, namespace: string, ...}}, spec: #Input}}
	output: nodes: [{{
		id: "config"
		object: {{apiVersion: "v1", kind: "ConfigMap", metadata: name: input.metadata.name, data: value: input.spec.value}}
	}}]
}}
"#
    )
}

#[tokio::test]
async fn the_image_runs_as_65532_from_its_own_root_and_serves_modules_over_ssh_and_https() {
    let env = support::env("image").await;
    if env.external {
        // Replacing the manager role of someone's cluster is not a test's business.
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rootfs = dir.path().join("rootfs");

    // Built, pushed, pulled back by digest, unpacked.
    let registry = remote::Registry::start();
    let digest = tokio::task::spawn_blocking({
        let addr = registry.addr.clone();
        move || build_and_push(&addr)
    })
    .await
    .unwrap();
    let config = pull_and_unpack(&registry.addr, &digest, dir.path(), &rootfs);

    // The image is the Dockerfile's: its environment, user, entrypoint and files.
    let definition = dockerfile_definition();
    let image_env: Vec<String> = serde_json::from_value(config["config"]["Env"].clone()).unwrap();
    for pair in &definition.env {
        assert!(
            image_env.contains(pair),
            "{pair} missing from the image's Env {image_env:?}"
        );
    }
    assert_eq!(config["config"]["User"], json!(definition.user));
    assert_eq!(definition.user, IMAGE_USER);
    assert_eq!(config["config"]["Entrypoint"], json!(definition.entrypoint));
    assert!(definition.files.len() >= 2, "{definition:?}");
    for file in definition.files.iter().chain(&definition.entrypoint) {
        let path = rootfs.join(file.trim_start_matches('/'));
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
        assert!(
            mode & 0o005 == 0o005,
            "{file} is not readable and executable by everyone: {mode:o}"
        );
    }
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap();
    assert!(
        passwd.lines().any(|l| l.starts_with("nonroot:x:65532:65532:")),
        "{passwd}"
    );

    // The size, and what takes it.
    let total = size_of(&rootfs);
    let part = |p: &str| size_of(&rootfs.join(p));
    eprintln!(
        "image: {} uncompressed: pequod {}, cue {}, shared libraries {}, git {}, the rest of the base {}",
        megabytes(total),
        megabytes(part("usr/local/bin/pequod")),
        megabytes(part("usr/local/bin/cue")),
        megabytes(part("usr/lib/x86_64-linux-gnu")),
        megabytes(part("usr/lib/git-core") + part("usr/bin/git")),
        megabytes(
            total
                - part("usr/local/bin")
                - part("usr/lib/x86_64-linux-gnu")
                - part("usr/lib/git-core")
                - part("usr/bin/git")
        ),
    );
    assert!(total < MAX_IMAGE_BYTES, "the image holds {}", megabytes(total));

    // A module in an OCI registry over HTTPS, trusted through the image's CA bundle (a cluster
    // with a private registry adds its CA the same way), and one in git over ssh.
    let (tls_addr, ca) = tls_registry(&registry, dir.path());
    let bundle = rootfs.join("etc/ssl/certs/ca-certificates.crt");
    let mut certificates = std::fs::read_to_string(&bundle).unwrap();
    certificates.push_str(&ca);
    std::fs::write(&bundle, certificates).unwrap();
    let oci_digest = remote::publish(
        &registry.addr,
        "modules/shelf",
        "v1",
        &module("Shelf"),
        &pequod::source::credentials::RegistryCredentials::Anonymous,
    )
    .await;
    let ssh = remote::ssh_server();
    let repo = remote::GitRepo::new_in(&remote::git_server().base);
    repo.commit(&[("module.cue", &module("Crate"))], "crate");
    let ssh_url = format!("ssh://{}@{}{}?ref=main", ssh.user, ssh.addr, repo.path().display());

    // The restricted install, and the image's pequod running as its service account.
    restricted::install(&env.kubeconfig);
    let kubeconfig = restricted::manager_kubeconfig(&env.client, &env.kubeconfig).await;
    std::fs::copy(&kubeconfig, rootfs.join("tmp/kubeconfig")).unwrap();
    run(Command::new("chown")
        .args(["65532:65532"])
        .arg(rootfs.join("tmp/kubeconfig")));
    let (metrics, probes, webhook) = (
        format!("127.0.0.1:{}", support::free_port()),
        format!("127.0.0.1:{}", support::free_port()),
        format!("127.0.0.1:{}", support::free_port()),
    );
    // As a container runtime starts it: the image's environment and nothing of the host's.
    let mut args: Vec<String> = vec!["-i".into()];
    args.extend(image_env.iter().cloned());
    args.extend([
        "HOME=/tmp".into(),
        "KUBECONFIG=/tmp/kubeconfig".into(),
        "/usr/sbin/chroot".into(),
        format!("--userspec={IMAGE_USER}"),
        rootfs.display().to_string(),
    ]);
    args.extend(definition.entrypoint.iter().cloned());
    args.extend([
        format!("--metrics-bind-address={metrics}"),
        "--metrics-secure".into(),
        format!("--health-probe-bind-address={probes}"),
        format!("--webhook-bind-address={webhook}"),
        format!("--webhook-url=https://{webhook}"),
        "--generate-rbac=false".into(),
        format!("--trusted-transform-namespaces={}", env.namespace),
        "--zap-log-level=debug".into(),
    ]);
    let log = support::control_plane::shared().spawn_process("pequod-image", Path::new("/usr/bin/env"), &args, &[]);
    support::wait_for("the image's pequod to be ready", WAIT, || async {
        match support::http_get(&probes, "/readyz").await {
            Ok((200, body)) => Ok(body),
            other => Err(format!(
                "{other:?}; log: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )),
        }
    })
    .await;

    let ssh_secret = json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/ssh-auth",
        "metadata": {"name": "ssh", "annotations": {"pequod.io/credential-hosts": "127.0.0.1"}},
        "stringData": {"ssh-privatekey": ssh.private_key, "known_hosts": ssh.known_hosts}});
    let group = format!("{}.image.example.com", env.namespace);
    let sources = BTreeMap::from([
        (
            "crate",
            json!({"type": "git", "ref": ssh_url, "pullSecretRef": {"name": "ssh"}}),
        ),
        (
            "shelf",
            json!({"type": "oci", "ref": format!("{tls_addr}/modules/shelf:v1")}),
        ),
    ]);
    support::apply_yaml(
        &env.client,
        &env.namespace,
        &serde_yaml::to_string(&ssh_secret).unwrap(),
    )
    .await;
    let transforms: Api<DynamicObject> = Api::namespaced_with(
        env.client.clone(),
        &env.namespace,
        &kube::discovery::ApiResource::erase::<pequod::api::Transform>(&()),
    );
    // The module is fetched and rendered (its CRD generated) by the image's git, ssh and cue;
    // then an administrator grants what the Transform asks (the restricted install).
    let condition_true = |name: &'static str, type_: &'static str| {
        let (transforms, log) = (transforms.clone(), log.clone());
        async move {
            support::wait_for(&format!("Transform {name} {type_}"), WAIT, || async {
                let t = transforms.get(name).await.map_err(|e| e.to_string())?;
                let condition = t.data["status"]["conditions"]
                    .as_array()
                    .and_then(|c| c.iter().find(|c| c["type"] == type_).cloned());
                match condition {
                    Some(c) if c["status"] == "True" => Ok(()),
                    _ => Err(format!(
                        "status {}; the operator's log: {}",
                        t.data["status"],
                        std::fs::read_to_string(&log).unwrap_or_default()
                    )),
                }
            })
            .await
        }
    };
    for (name, cue_ref) in &sources {
        let transform = json!({"apiVersion": "platform.platform.example.com/v1alpha1", "kind": "Transform",
            "metadata": {"name": name},
            "spec": {"cueRef": cue_ref, "group": group, "managedResources": [{"resources": ["configmaps"]}]}});
        support::apply_yaml(&env.client, &env.namespace, &serde_yaml::to_string(&transform).unwrap()).await;
    }
    for (name, cue_ref) in &sources {
        if cue_ref.get("pullSecretRef").is_some() {
            // The restricted manager reads no Secret it was not granted: the pull Secret's
            // Role comes first (`pequod rbac` prints it before the CRD exists, docs/rbac.md).
            restricted::grant_transform(&env.kubeconfig, &env.namespace, name);
        }
        condition_true(name, "CRDGenerated").await;
        restricted::grant_transform(&env.kubeconfig, &env.namespace, name);
        condition_true(name, "Ready").await;
    }
    if let Some(Value::String(resolved)) = transforms.get("shelf").await.unwrap().data["status"]["resolvedCueRef"]
        .get("digest")
        .cloned()
    {
        assert_eq!(resolved, oci_digest);
    }

    // Each kind renders through the image's cue into its ConfigMap.
    let configmaps: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.namespace);
    for (kind, name) in [("Crate", "one-crate"), ("Shelf", "one-shelf")] {
        let instance = json!({"apiVersion": format!("{group}/v1alpha1"), "kind": kind,
            "metadata": {"name": name}, "spec": {"value": kind}});
        support::apply_yaml(&env.client, &env.namespace, &serde_yaml::to_string(&instance).unwrap()).await;
        support::wait_for(&format!("ConfigMap {name}"), WAIT, || async {
            let cm = configmaps.get(name).await.map_err(|e| e.to_string())?;
            match cm.data.as_ref().and_then(|d| d.get("value")) {
                Some(value) if value == kind => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
    }

    // /metrics answers over HTTPS with a token allowed to read it.
    let admin_token = restricted::admin_token(&env.kubeconfig);
    let (status, body) = support::wait_for("the image's /metrics", WAIT, || async {
        support::https_get(&metrics, "/metrics", Some(&admin_token)).await
    })
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("pequod_reconcile_total"), "{body:.500}");
}
