//! The restricted installation (`config/restricted`): applied to the test control plane, a
//! kubeconfig of its manager service account, and what an administrator grants a Transform.

use std::path::{Path, PathBuf};

use kube::Client;

pub const MANAGER_NAMESPACE: &str = "pequod-system";
pub const MANAGER_ACCOUNT: &str = "pequod-controller-manager";

/// `kubectl apply -k config/restricted` as the administrator.
pub fn install(kubeconfig: &Path) {
    let kustomization = crate::repo_root().join("config/restricted");
    let out = kubectl(
        kubeconfig,
        &["apply", "--server-side", "-k", &kustomization.display().to_string()],
        "",
    );
    assert!(out.contains("pequod-controller-manager"), "{out}");
}

/// A kubeconfig that authenticates as the manager's service account, standing alone (the
/// apiserver's CA inline), so that it works from another root filesystem too.
pub async fn manager_kubeconfig(client: &Client, admin: &Path) -> PathBuf {
    use base64::Engine as _;
    let token = crate::service_account_token(client, MANAGER_NAMESPACE, MANAGER_ACCOUNT).await;
    let mut config = kube::config::Kubeconfig::read_from(admin).expect("the admin kubeconfig");
    for named in &mut config.clusters {
        if let Some(cluster) = named.cluster.as_mut()
            && let Some(file) = cluster.certificate_authority.take()
        {
            let ca = std::fs::read(&file).expect("the apiserver's CA");
            cluster.certificate_authority_data = Some(base64::engine::general_purpose::STANDARD.encode(ca));
        }
    }
    for named in &mut config.auth_infos {
        named.auth_info = Some(kube::config::AuthInfo {
            token: Some(token.clone().into()),
            ..Default::default()
        });
    }
    let text = serde_yaml::to_string(&config).expect("kubeconfig as YAML");
    let path = admin.with_file_name("manager-kubeconfig");
    std::fs::write(&path, text).expect("write the manager's kubeconfig");
    path
}

/// `pequod rbac NAMESPACE/NAME`, run as the administrator, applied with kubectl; returns what
/// was applied.
pub fn grant_transform(kubeconfig: &Path, namespace: &str, name: &str) -> String {
    let out = std::process::Command::new(crate::pequod_binary())
        .env("KUBECONFIG", kubeconfig)
        .args(["rbac", &format!("{namespace}/{name}")])
        .output()
        .expect("run pequod rbac");
    assert!(
        out.status.success(),
        "pequod rbac failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = String::from_utf8_lossy(&out.stdout).into_owned();
    kubectl(kubeconfig, &["apply", "--server-side", "-f", "-"], &yaml);
    yaml
}

/// Runs kubectl with `kubeconfig` and `stdin`, and returns its output; fails the test when
/// kubectl fails.
pub fn kubectl(kubeconfig: &Path, args: &[&str], stdin: &str) -> String {
    let out = crate::kubectl_with_input(kubeconfig, args, stdin);
    assert!(
        out.status.success(),
        "kubectl {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The bearer token of the (administrator's) kubeconfig `kubeconfig`.
pub fn admin_token(kubeconfig: &Path) -> String {
    let text = std::fs::read_to_string(kubeconfig).expect("the admin kubeconfig");
    let config: serde_yaml::Value = serde_yaml::from_str(&text).expect("kubeconfig YAML");
    config["users"][0]["user"]["token"]
        .as_str()
        .expect("a token in the admin kubeconfig")
        .to_string()
}
