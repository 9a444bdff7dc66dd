//! Cloud resources on the real apiserver, with the cloud controllers' real CRDs (ACK's S3
//! Bucket and Config Connector's StorageBucket, installed into bin/crds by `make tools` from
//! the controllers' Go modules). No cloud and no cloud controller runs here: where a test
//! needs the controller's verdict, it writes the status conditions the real controller writes,
//! and says so where it does. Nothing else in the suite patches status.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::rbac::v1::ClusterRole;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, DynamicObject, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use pequod::api::{NodePhase, ResourceGraph};
use serde_json::{Value, json};

use crate::support::instances::{apply_instance, wait_instance};
use crate::support::transforms::{WAIT, apply_transform, delete_transform, failed, group, setup};
use crate::support::{self, TEST_MANAGER, TestEnv, wait_for};

const ACK_BUCKET_CRD: &str = "s3.services.k8s.aws_buckets.yaml";
const KCC_BUCKET_CRD: &str =
    "apiextensions.k8s.io_v1_customresourcedefinition_storagebuckets.storage.cnrm.cloud.google.com.yaml";
/// The finalizer ACK's S3 controller puts on a Bucket, which holds its deletion until the
/// controller has applied the deletion policy in the cloud.
const ACK_FINALIZER: &str = "finalizers.s3.services.k8s.aws/Bucket";
const KCC_FINALIZER: &str = "cnrm.cloud.google.com/finalizer";

/// Installs a cloud controller's CRD from bin/crds and waits until it is Established.
async fn install_cloud_crd(client: &Client, file: &str) {
    let path = support::repo_root().join("bin/crds").join(file);
    let yaml =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}; `make tools` fetches it", path.display()));
    let crd: CustomResourceDefinition = serde_yaml::from_str(&yaml).unwrap();
    support::apply_crd(client, &crd).await;
}

/// A Transform serving the embedded webapp module with the platform's `settings`, allowed the
/// one cloud kind it renders.
async fn serve_webapp(
    env: &TestEnv,
    transforms: &Api<pequod::api::Transform>,
    settings: Value,
    cloud: (&str, &str),
) -> Api<DynamicObject> {
    apply_transform(
        transforms,
        "webapp",
        json!({
            "cueRef": {"type": "embedded", "ref": "webapp"},
            "group": group(env),
            "managedResources": [{"apiGroup": cloud.0, "resources": [cloud.1]}],
            "settings": settings,
        }),
    )
    .await;
    support::wait_transform_ready(transforms, "webapp").await;
    support::dynamic_api(
        &env.client,
        &format!("{}/v1alpha1", group(env)),
        "WebApp",
        &env.namespace,
    )
    .await
}

/// The developer's WebApp `photos`, the same on every cloud; returns its graph's name.
async fn apply_photos(env: &TestEnv, webapps: &Api<DynamicObject>) -> String {
    let api_version = format!("{}/v1alpha1", group(env));
    apply_instance(
        webapps,
        &api_version,
        "WebApp",
        "photos",
        json!({"image": "nginx:1.27", "bucket": {}}),
    )
    .await;
    format!("webapp.{}-photos", group(env))
}

async fn node_state(env: &TestEnv, graph: &str, node: &str) -> Option<(NodePhase, String)> {
    let graphs: Api<ResourceGraph> = Api::namespaced(env.client.clone(), &env.namespace);
    let graph = graphs.get_opt(graph).await.ok()??;
    let state = graph.status?.node_states.get(node)?.clone();
    Some((state.phase, state.message.unwrap_or_default()))
}

async fn wait_node(env: &TestEnv, graph: &str, node: &str, phase: NodePhase, message: &str) {
    wait_for(&format!("node {node} {phase:?} saying {message:?}"), WAIT, || async {
        match node_state(env, graph, node).await {
            Some((p, m)) if p == phase && m.contains(message) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

/// Plays the cloud controller: writes `status` through the status subresource.
async fn controller_reports(buckets: &Api<DynamicObject>, name: &str, status: Value) {
    buckets
        .patch_status(name, &PatchParams::default(), &Patch::Merge(json!({"status": status})))
        .await
        .unwrap_or_else(|e| panic!("status of {name}: {e}"));
}

/// Plays the cloud controller: puts its finalizer on the resource, as it does when it first
/// sees it.
async fn controller_holds(buckets: &Api<DynamicObject>, name: &str, finalizer: &str) {
    buckets
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": [finalizer]}})),
        )
        .await
        .unwrap();
}

async fn bucket_env(env: &TestEnv, deployment: &str) -> Vec<(String, String)> {
    let deployment = Api::<Deployment>::namespaced(env.client.clone(), &env.namespace)
        .get(deployment)
        .await
        .unwrap();
    let container = &deployment.spec.unwrap().template.spec.unwrap().containers[0];
    container
        .env
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|e| (e.name, e.value.unwrap_or_default()))
        .collect()
}

/// Deletes the instance, and checks that Pequod deletes the cloud resource last, carrying the
/// deletion policy the controller reads (`annotation` = `policy`), and only after the
/// Deployment that used it is gone. Then plays the controller letting go of it.
async fn delete_and_check_policy(
    env: &TestEnv,
    instances: &Api<DynamicObject>,
    buckets: &Api<DynamicObject>,
    (instance, bucket): (&str, &str),
    (annotation, policy): (&str, &str),
) {
    instances.delete(instance, &DeleteParams::default()).await.unwrap();
    let terminating = wait_for("the bucket to be deleted by Pequod", WAIT, || async {
        match buckets.get_opt(bucket).await {
            Ok(Some(b)) if b.metadata.deletion_timestamp.is_some() => Ok(b),
            other => Err(format!("{:?}", other.map(|b| b.map(|b| b.metadata.deletion_timestamp)))),
        }
    })
    .await;
    let deployments = Api::<Deployment>::namespaced(env.client.clone(), &env.namespace);
    assert!(
        deployments.get_opt(instance).await.unwrap().is_none(),
        "the Deployment is deleted before the bucket it depends on"
    );
    assert_eq!(
        terminating.annotations().get(annotation).map(String::as_str),
        Some(policy),
        "the controller finds the deletion policy on the object it is asked to delete"
    );
    // Playing the controller: it has kept or deleted the cloud's bucket as told, and lets go.
    buckets
        .patch(
            bucket,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .unwrap();
    support::delete_and_wait_gone(instances, instance, WAIT).await;
    assert!(buckets.get_opt(bucket).await.unwrap().is_none());
}

#[tokio::test]
async fn a_webapp_on_eks_waits_for_its_ack_bucket_takes_its_name_and_keeps_it_on_teardown() {
    let (env, transforms) = setup("cloud-ack").await;
    install_cloud_crd(&env.client, ACK_BUCKET_CRD).await;
    let webapps = serve_webapp(
        &env,
        &transforms,
        json!({"provider": "aws"}),
        ("s3.services.k8s.aws", "buckets"),
    )
    .await;

    // The generated role covers the one cloud kind the Transform manages, and no other.
    let role = Api::<ClusterRole>::all(env.client.clone())
        .get(&format!("pequod:transform:{}.webapp", env.namespace))
        .await
        .unwrap();
    let s3: Vec<_> = role
        .rules
        .unwrap()
        .into_iter()
        .filter(|r| {
            r.api_groups
                .as_ref()
                .is_some_and(|g| g.iter().any(|g| g.contains("aws")))
        })
        .collect();
    assert_eq!(s3.len(), 1);
    assert_eq!(s3[0].api_groups, Some(vec!["s3.services.k8s.aws".to_string()]));
    assert_eq!(s3[0].resources, Some(vec!["buckets".to_string()]));

    let graph = apply_photos(&env, &webapps).await;
    let buckets = support::dynamic_api(&env.client, "s3.services.k8s.aws/v1alpha1", "Bucket", &env.namespace).await;
    wait_node(
        &env,
        &graph,
        "bucket",
        NodePhase::WaitingReady,
        "has not reported ACK.ResourceSynced",
    )
    .await;
    let bucket = buckets.get("photos-bucket").await.unwrap();
    let cloud_name = format!("{}-photos", env.namespace);
    assert_eq!(bucket.data["spec"]["name"], cloud_name.as_str());
    assert_eq!(bucket.annotations()["services.k8s.aws/deletion-policy"], "retain");
    let deployments = Api::<Deployment>::namespaced(env.client.clone(), &env.namespace);
    assert!(
        deployments.get_opt("photos").await.unwrap().is_none(),
        "the Deployment waits for its bucket"
    );

    // Playing ACK's S3 controller: it takes the Bucket and reports it synced, with its ARN.
    controller_holds(&buckets, "photos-bucket", ACK_FINALIZER).await;
    let arn = format!("arn:aws:s3:::{cloud_name}");
    controller_reports(
        &buckets,
        "photos-bucket",
        json!({
            "ackResourceMetadata": {"arn": arn, "ownerAccountID": "111122223333", "region": "eu-west-1"},
            "conditions": [{"type": "ACK.ResourceSynced", "status": "True", "message": "Resource synced"}],
        }),
    )
    .await;
    let ready = wait_instance(&webapps, "photos", "Ready", "True", "Ready").await;
    assert_eq!(ready.data["status"]["bucket"], cloud_name.as_str());
    assert_eq!(ready.data["status"]["bucketId"], arn.as_str());
    assert_eq!(ready.data["status"]["provider"], "aws");
    let env_vars = bucket_env(&env, "photos").await;
    assert_eq!(
        env_vars[..2],
        [
            ("BUCKET_NAME".into(), cloud_name.clone()),
            ("BUCKET_ID".into(), arn.clone())
        ]
    );

    // Playing ACK: a terminal error fails the node at once, with the controller's words.
    let terminal = "InvalidBucketName: The specified bucket is not valid.";
    controller_reports(
        &buckets,
        "photos-bucket",
        json!({"conditions": [
            {"type": "ACK.ResourceSynced", "status": "False"},
            {"type": "ACK.Terminal", "status": "True", "message": terminal},
        ]}),
    )
    .await;
    let failed_at = std::time::Instant::now();
    wait_node(&env, &graph, "bucket", NodePhase::Error, terminal).await;
    assert!(
        failed_at.elapsed() < Duration::from_secs(60),
        "not the 900 s gate timeout"
    );
    let failed = wait_instance(&webapps, "photos", "Ready", "False", "NodeFailed").await;
    let message = failed.data["status"]["conditions"].to_string();
    assert!(message.contains(terminal), "{message}");

    // Playing ACK: a recoverable error keeps the node waiting, saying why.
    controller_reports(
        &buckets,
        "photos-bucket",
        json!({"conditions": [
            {"type": "ACK.ResourceSynced", "status": "False"},
            {"type": "ACK.Terminal", "status": "False"},
            {"type": "ACK.Recoverable", "status": "True", "message": "ThrottlingException: Rate exceeded"},
        ]}),
    )
    .await;
    wait_node(
        &env,
        &graph,
        "bucket",
        NodePhase::WaitingReady,
        "recoverable error, retrying: ThrottlingException",
    )
    .await;
    controller_reports(
        &buckets,
        "photos-bucket",
        json!({"conditions": [
            {"type": "ACK.ResourceSynced", "status": "True"},
            {"type": "ACK.Terminal", "status": "False"},
            {"type": "ACK.Recoverable", "status": "False"},
        ]}),
    )
    .await;
    wait_instance(&webapps, "photos", "Ready", "True", "Ready").await;

    delete_and_check_policy(
        &env,
        &webapps,
        &buckets,
        ("photos", "photos-bucket"),
        ("services.k8s.aws/deletion-policy", "retain"),
    )
    .await;
    delete_transform(&transforms, "webapp").await;
    env.cleanup().await;
}

#[tokio::test]
async fn the_same_webapp_moves_to_gke_by_the_platforms_setting() {
    let (env, transforms) = setup("cloud-gke").await;
    install_cloud_crd(&env.client, KCC_BUCKET_CRD).await;

    // Settings are flat: a nested value is refused by the apiserver, so no Transform holds one
    // deeper than a client can decode.
    let nested = json!({
        "apiVersion": "platform.platform.example.com/v1alpha1", "kind": "Transform",
        "metadata": {"name": "webapp"},
        "spec": {"cueRef": {"type": "embedded", "ref": "webapp"}, "settings": {"gcp": {"location": "EU"}}},
    });
    let refused = transforms
        .patch(
            "webapp",
            &PatchParams::apply(TEST_MANAGER).force(),
            &Patch::Apply(nested),
        )
        .await
        .unwrap_err();
    assert!(matches!(&refused, kube::Error::Api(s) if s.code == 422), "{refused}");

    // Settings the module does not declare are refused, with the module's words.
    apply_transform(
        &transforms,
        "webapp",
        json!({"cueRef": {"type": "embedded", "ref": "webapp"}, "group": group(&env),
               "settings": {"provider": "gcp", "gcp.zone": "europe-west1-b"}}),
    )
    .await;
    let (_, message) = failed(&transforms, "webapp", "SchemaExtracted", "InvalidSettings").await;
    assert!(message.contains("zone: field not allowed"), "{message}");

    let webapps = serve_webapp(
        &env,
        &transforms,
        json!({"provider": "gcp", "bucketPrefix": "acme-", "gcp.location": "EU"}),
        ("storage.cnrm.cloud.google.com", "storagebuckets"),
    )
    .await;
    // The very instance the EKS cluster runs: developers change nothing.
    let graph = apply_photos(&env, &webapps).await;
    let buckets = support::dynamic_api(
        &env.client,
        "storage.cnrm.cloud.google.com/v1beta1",
        "StorageBucket",
        &env.namespace,
    )
    .await;
    wait_node(
        &env,
        &graph,
        "bucket",
        NodePhase::WaitingReady,
        "Config Connector has not reported Ready",
    )
    .await;
    let bucket = buckets.get("photos-bucket").await.unwrap();
    let cloud_name = format!("acme-{}-photos", env.namespace);
    assert_eq!(bucket.data["spec"]["resourceID"], cloud_name.as_str());
    assert_eq!(bucket.data["spec"]["location"], "EU");
    assert_eq!(bucket.annotations()["cnrm.cloud.google.com/deletion-policy"], "abandon");

    // Playing Config Connector: a terminal reason fails the node with its message.
    controller_holds(&buckets, "photos-bucket", KCC_FINALIZER).await;
    let generation = bucket.metadata.generation.unwrap();
    let taken = "googleapi: Error 409: The requested bucket name is not available.";
    controller_reports(
        &buckets,
        "photos-bucket",
        json!({"observedGeneration": generation, "conditions": [
            {"type": "Ready", "status": "False", "reason": "UpdateFailed", "message": taken},
        ]}),
    )
    .await;
    wait_node(
        &env,
        &graph,
        "bucket",
        NodePhase::Error,
        &format!("Config Connector reports UpdateFailed: {taken}"),
    )
    .await;

    // Playing Config Connector: a dependency not ready yet waits; then up to date is ready.
    controller_reports(
        &buckets,
        "photos-bucket",
        json!({"conditions": [
            {"type": "Ready", "status": "False", "reason": "DependencyNotReady", "message": "project not ready"},
        ]}),
    )
    .await;
    wait_node(
        &env,
        &graph,
        "bucket",
        NodePhase::WaitingReady,
        "DependencyNotReady: project not ready",
    )
    .await;
    let self_link = format!("https://www.googleapis.com/storage/v1/b/{cloud_name}");
    controller_reports(
        &buckets,
        "photos-bucket",
        json!({"selfLink": self_link, "url": format!("gs://{cloud_name}"), "conditions": [
            {"type": "Ready", "status": "True", "reason": "UpToDate", "message": "The resource is up to date"},
        ]}),
    )
    .await;
    let ready = wait_instance(&webapps, "photos", "Ready", "True", "Ready").await;
    assert_eq!(ready.data["status"]["provider"], "gcp");
    assert_eq!(ready.data["status"]["bucketId"], self_link.as_str());
    let env_vars = bucket_env(&env, "photos").await;
    assert_eq!(
        env_vars[..2],
        [
            ("BUCKET_NAME".into(), cloud_name.clone()),
            ("BUCKET_ID".into(), self_link)
        ]
    );

    delete_and_check_policy(
        &env,
        &webapps,
        &buckets,
        ("photos", "photos-bucket"),
        ("cnrm.cloud.google.com/deletion-policy", "abandon"),
    )
    .await;
    delete_transform(&transforms, "webapp").await;
    env.cleanup().await;
}
