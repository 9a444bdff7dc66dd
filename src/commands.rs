//! The subcommands. `crd`, `render` and `schema` need no cluster; `rbac` reads a Transform
//! and `publish` pushes to a registry.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use serde_json::Value;

use crate::api::Severity;
use crate::cli::{CueArgs, OutputFormat};
use crate::crd::{CrdParams, build_crd, kind_names};
use crate::cue::{ModuleFiles, Renderer, RendererConfig, input_hash, render_input};
use crate::instance_graph::{InstanceRef, render_hash, resource_graph};
use crate::metrics::Metrics;

/// A command's failure: the message for stderr and the exit code.
#[derive(Debug)]
pub struct CommandError {
    pub message: String,
    pub code: u8,
}

impl CommandError {
    fn new(message: impl std::fmt::Display) -> Self {
        Self {
            message: message.to_string(),
            code: 1,
        }
    }
}

/// Exit code when rendering worked but an Error-severity policy violation blocks the result.
pub const EXIT_POLICY_VIOLATION: u8 = 3;

pub fn crd(output_dir: Option<&Path>) -> Result<(), CommandError> {
    let docs = crate::api::crds_yaml().map_err(|e| CommandError::new(format!("rendering CRDs: {e}")))?;
    for (file, yaml) in docs {
        match output_dir {
            Some(dir) => {
                let path = dir.join(&file);
                std::fs::write(&path, yaml)
                    .map_err(|e| CommandError::new(format!("writing {}: {e}", path.display())))?;
            }
            None => print!("---\n{yaml}"),
        }
    }
    Ok(())
}

/// `--module`: a folder of .cue files, or the name of an embedded module.
fn load_module_files(module: &str) -> Result<(ModuleFiles, String), CommandError> {
    let path = PathBuf::from(module);
    if path.is_dir() {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| module.to_string());
        return ModuleFiles::from_dir(&path)
            .map(|f| (f, name))
            .map_err(CommandError::new);
    }
    ModuleFiles::embedded(module)
        .map(|f| (f, module.to_string()))
        .map_err(|e| CommandError::new(format!("{module} is neither a folder nor an embedded module: {e}")))
}

/// The Transform `NAMESPACE/NAME`, from the cluster of the current kubeconfig.
async fn read_transform(transform: &str) -> Result<(kube::Client, crate::api::Transform), CommandError> {
    let (ns, name) = transform
        .split_once('/')
        .ok_or_else(|| CommandError::new(format!("{transform}: want NAMESPACE/NAME")))?;
    let client = kube::Client::try_default()
        .await
        .map_err(|e| CommandError::new(format!("connecting to the cluster: {e}")))?;
    let t = kube::Api::<crate::api::Transform>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .map_err(|e| CommandError::new(format!("reading Transform {transform}: {e}")))?;
    Ok((client, t))
}

/// `pequod rbac NAMESPACE/NAME`: prints, as YAML, the Role or ClusterRole (and the pull
/// Secret's Role) that a restricted manager needs for the Transform.
pub async fn rbac(transform: &str, service_account: String, namespace: String) -> Result<(), CommandError> {
    use crate::rbac::{self, Generated, ManagerIdentity, ServedKind, TransformIdentity};
    use kube::{Resource, ResourceExt};

    let (client, t) = read_transform(transform).await?;
    let (namespace_of_t, name_of_t) = (t.namespace().unwrap_or_default(), t.name_any());
    let (ns, name) = (namespace_of_t.as_str(), name_of_t.as_str());
    let manager = ManagerIdentity {
        service_account,
        namespace,
    };
    let identity = TransformIdentity {
        name,
        namespace: ns,
        owner: t.controller_owner_ref(&()),
    };
    let mut documents: Vec<Value> = Vec::new();
    let to_value = |v: Result<Value, serde_json::Error>| v.map_err(|e| CommandError::new(format!("encoding: {e}")));
    if let Some(secret) = &t.spec.cue_ref.pull_secret_ref {
        let (role, binding) = rbac::pull_secret_access(&identity, &secret.name, &manager);
        documents.push(to_value(serde_json::to_value(role))?);
        documents.push(to_value(serde_json::to_value(binding))?);
    }
    match newest_crd(client, (ns, name), transform).await? {
        Some(crd) => {
            let served = ServedKind {
                group: &crd.spec.group,
                plural: &crd.spec.names.plural,
            };
            let rules = rbac::rules(&t.spec.managed_resources, &served);
            match rbac::generate(t.spec.rbac_scope, &identity, rules, &manager) {
                Generated::Cluster(role) => documents.push(to_value(serde_json::to_value(role))?),
                Generated::Namespace(generated) => {
                    let (role, binding) = *generated;
                    documents.push(to_value(serde_json::to_value(role))?);
                    documents.push(to_value(serde_json::to_value(binding))?);
                }
            }
        }
        None if documents.is_empty() => {
            return Err(CommandError::new(format!(
                "Transform {transform} has generated no CRD yet; \
                 run again once its condition CRDGenerated is True"
            )));
        }
        None => eprintln!(
            "Transform {transform} has no CRD yet: this is the pull Secret's access only; \
             run again once its condition CRDGenerated is True"
        ),
    }
    for document in documents {
        let yaml = serde_yaml::to_string(&document).map_err(|e| CommandError::new(format!("encoding: {e}")))?;
        print!("---\n{yaml}");
    }
    Ok(())
}

/// The kind a Transform serves: the newest CRD it generated (while a kind is renamed, the new
/// one).
async fn newest_crd(
    client: kube::Client,
    (ns, name): (&str, &str),
    transform: &str,
) -> Result<
    Option<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>,
    CommandError,
> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let crds = kube::Api::<CustomResourceDefinition>::all(client)
        .list(&kube::api::ListParams::default().labels(&format!(
            "{}={},{}={}",
            crate::api::names::TRANSFORM_LABEL,
            crate::naming::label_value(name),
            crate::api::names::TRANSFORM_NAMESPACE_LABEL,
            crate::naming::label_value(ns)
        )))
        .await
        .map_err(|e| CommandError::new(format!("listing the CRDs of Transform {transform}: {e}")))?;
    Ok(crds
        .items
        .into_iter()
        .max_by(|a, b| a.metadata.creation_timestamp.cmp(&b.metadata.creation_timestamp)))
}

/// What a candidate module does to the kind itself.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct SchemaPlan {
    /// Whether the generated CRD would change.
    changed: bool,
    /// Changes stored instances would not survive; the Transform would refuse them.
    breaking: Vec<String>,
}

/// The whole plan.
#[derive(serde::Serialize)]
struct Plan {
    module: String,
    schema: SchemaPlan,
    /// Counts, and the deletions and replacements of the Transform's protected kinds, which
    /// wait for approval: what the Transform's status would show.
    summary: crate::api::PlanSummary,
    instances: Vec<InstancePlan>,
    /// A candidate of several versions: each instance's spec in each served version
    /// (`namespace/name` → version → spec, or the conversion's error).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    versions: BTreeMap<String, BTreeMap<String, SpecInVersion>>,
}

/// An instance's spec as it reads in one version, or why it cannot be converted.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
enum SpecInVersion {
    Spec(serde_json::Value),
    Error(String),
}

use crate::rollout::plan::InstancePlan;

/// `pequod plan --transform NS/NAME --module M`: renders every instance of the Transform's kind
/// with the candidate module and compares the result with the graph each has.
pub async fn plan(
    transform: &str,
    module: &str,
    format: crate::cli::PlanFormat,
    cue: &CueArgs,
) -> Result<(), CommandError> {
    use crate::api::RbacScope;
    use kube::ResourceExt;

    let (client, t) = read_transform(transform).await?;
    let ns = t.namespace().unwrap_or_default();
    let ns = ns.as_str();
    let (crd, resource) = served_kind(&t, transform)?;
    let instances = list_instances(&client, &t, &resource).await?;

    let (files, platform) = load_module_files(module)?;
    // The candidate is planned as the Transform would load it: with its settings.
    let files = files.with_settings(&t.spec.settings).map_err(CommandError::new)?;
    let renderer = renderer(cue)?;
    let candidate = renderer.load(files, &platform).await.map_err(CommandError::new)?;
    let schema = schema_plan(&client, &t, &crd.name, &renderer, &candidate).await?;
    let candidate_schema = renderer.schema(&candidate).await.map_err(CommandError::new)?;
    // The candidate renders from its storage version: instances served in another are
    // converted with the candidate's conversions first, as the apiserver would.
    let storage = crate::crd::storage_version(&candidate_schema, &t.spec.version);
    let instances = in_version(&renderer, &candidate, &instances, &resource.version, &storage).await?;
    let versions = instance_versions(&renderer, &candidate, &candidate_schema, &instances, &storage).await;
    let metrics = Arc::new(Metrics::new().map_err(CommandError::new)?);
    let applier = crate::apply::Applier::new(client.clone(), metrics);
    let tools = crate::controller::fleet_plan::Tools {
        client: &client,
        renderer: &renderer,
        applier: &applier,
        watches: None,
        read_namespaces: &t.spec.read_namespaces,
    };
    let scope = (t.spec.rbac_scope == RbacScope::Namespace).then_some(ns);
    let plans = crate::controller::fleet_plan::plan_instances(
        &tools,
        &resource,
        scope,
        &instances,
        &candidate,
        t.spec.allow_cluster_scoped_resources,
    )
    .await
    .map_err(|e| CommandError::new(format!("reading the graphs of {}: {e}", crd.kind)))?;
    let protected = crate::rollout::Policy::from_spec(t.spec.rollout.as_ref())
        .map(|p| p.protected_kinds)
        .map_err(|e| CommandError::new(format!("spec.rollout: {e}")))?;
    let plan = Plan {
        module: candidate.digest.clone(),
        schema,
        summary: crate::rollout::plan::summarize(&candidate.digest, &plans, &protected),
        instances: plans,
        versions,
    };
    match format {
        crate::cli::PlanFormat::Json => {
            println!("{}", serde_json::to_string_pretty(&plan).map_err(CommandError::new)?);
        }
        crate::cli::PlanFormat::Table => print_plan(&plan),
    }
    Ok(())
}

/// `instances` (served in `from`) as they read in `to`, converted by `module`.
async fn in_version(
    renderer: &Renderer,
    module: &crate::cue::Module,
    instances: &[Arc<kube::api::DynamicObject>],
    from: &str,
    to: &str,
) -> Result<Vec<Arc<kube::api::DynamicObject>>, CommandError> {
    use kube::ResourceExt;
    if from == to {
        return Ok(instances.to_vec());
    }
    let items: Vec<crate::cue::Conversion> = instances
        .iter()
        .map(|i| crate::cue::Conversion {
            from: from.to_string(),
            to: to.to_string(),
            spec: i.data.get("spec").cloned().unwrap_or_default(),
        })
        .collect();
    let converted = renderer.convert(module, &items).await;
    instances
        .iter()
        .zip(converted)
        .map(|(instance, spec)| {
            let spec = spec.map_err(|e| {
                CommandError::new(format!(
                    "{}/{}: converting from {from} to {to}: {e}",
                    instance.namespace().unwrap_or_default(),
                    instance.name_any()
                ))
            })?;
            let mut moved = (**instance).clone();
            moved.data["spec"] = spec;
            Ok(Arc::new(moved))
        })
        .collect()
}

/// Each instance (in `storage`) in every other version the candidate serves.
async fn instance_versions(
    renderer: &Renderer,
    module: &crate::cue::Module,
    schema: &crate::cue::ModuleSchema,
    instances: &[Arc<kube::api::DynamicObject>],
    storage: &str,
) -> BTreeMap<String, BTreeMap<String, SpecInVersion>> {
    use kube::ResourceExt;
    let served: Vec<&str> = schema
        .versions
        .iter()
        .filter(|v| v.served && !v.storage)
        .map(|v| v.name.as_str())
        .collect();
    let mut items = Vec::new();
    for instance in instances {
        for version in &served {
            items.push(crate::cue::Conversion {
                from: storage.to_string(),
                to: version.to_string(),
                spec: instance.data.get("spec").cloned().unwrap_or_default(),
            });
        }
    }
    let mut converted = renderer.convert(module, &items).await.into_iter();
    let mut out = BTreeMap::new();
    for instance in instances {
        let key = format!("{}/{}", instance.namespace().unwrap_or_default(), instance.name_any());
        let mut by_version = BTreeMap::from([(
            storage.to_string(),
            SpecInVersion::Spec(instance.data.get("spec").cloned().unwrap_or_default()),
        )]);
        for version in &served {
            if let Some(result) = converted.next() {
                let view = result.map_or_else(|e| SpecInVersion::Error(e.to_string()), SpecInVersion::Spec);
                by_version.insert(version.to_string(), view);
            }
        }
        if !served.is_empty() {
            out.insert(key, by_version);
        }
    }
    out
}

/// The kind a Transform serves, as its status records it.
fn served_kind(
    t: &crate::api::Transform,
    transform: &str,
) -> Result<(crate::api::GeneratedCrd, kube::api::ApiResource), CommandError> {
    let crd = t
        .status
        .as_ref()
        .and_then(|s| s.generated_crd.clone())
        .ok_or_else(|| CommandError::new(format!("Transform {transform} serves no kind yet")))?;
    let (group, version) = crd
        .api_version
        .split_once('/')
        .unwrap_or(("", crd.api_version.as_str()));
    let resource = kube::api::ApiResource {
        group: group.to_string(),
        version: version.to_string(),
        api_version: crd.api_version.clone(),
        kind: crd.kind.clone(),
        plural: crd.plural.clone(),
    };
    Ok((crd, resource))
}

/// Every instance of the Transform's kind, where its RBAC scope lets them be.
async fn list_instances(
    client: &kube::Client,
    t: &crate::api::Transform,
    resource: &kube::api::ApiResource,
) -> Result<Vec<Arc<kube::api::DynamicObject>>, CommandError> {
    use crate::api::RbacScope;
    use kube::ResourceExt;
    use kube::api::{Api, DynamicObject, ListParams};
    let ns = t.namespace().unwrap_or_default();
    let instances: Api<DynamicObject> = match t.spec.rbac_scope {
        RbacScope::Namespace => Api::namespaced_with(client.clone(), &ns, resource),
        RbacScope::Cluster => Api::all_with(client.clone(), resource),
    };
    let listed = instances
        .list(&ListParams::default())
        .await
        .map_err(|e| CommandError::new(format!("listing {}: {e}", resource.kind)))?;
    Ok(listed.items.into_iter().map(Arc::new).collect())
}

/// The candidate module's CRD against the live one.
async fn schema_plan(
    client: &kube::Client,
    t: &crate::api::Transform,
    crd_name: &str,
    renderer: &Renderer,
    candidate: &crate::cue::Module,
) -> Result<SchemaPlan, CommandError> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::{Api, ResourceExt};
    let schema = renderer.schema(candidate).await.map_err(CommandError::new)?;
    let names = crate::crd::kind_names(&t.name_any(), &schema, &t.spec.short_names).map_err(CommandError::new)?;
    let namespace = t.namespace().unwrap_or_default();
    let live = Api::<CustomResourceDefinition>::all(client.clone())
        .get_opt(crd_name)
        .await
        .map_err(|e| CommandError::new(format!("reading CRD {crd_name}: {e}")))?;
    // The plan writes nothing: the webhook the live CRD names stands in for the one the
    // operator would name (its path changes with the module, which the plan shows as a change).
    let conversion = live
        .as_ref()
        .and_then(|l| l.spec.conversion.as_ref())
        .and_then(|c| c.webhook.as_ref())
        .and_then(|w| w.client_config.clone());
    let desired = build_crd(
        &names,
        &schema,
        &CrdParams {
            group: &t.spec.group,
            version: &t.spec.version,
            categories: &t.spec.categories,
            transform_name: &t.name_any(),
            transform_namespace: &namespace,
            conversion,
        },
    );
    Ok(match live {
        Some(live) => SchemaPlan {
            // As the Transform decides whether to write it: the live CRD holds the desired one.
            changed: !crate::executor::object::contains(
                &serde_json::to_value(&live).map_err(CommandError::new)?,
                &serde_json::to_value(&desired).map_err(CommandError::new)?,
            ),
            breaking: crate::crd::compat::crd_breaking_changes(&live, &desired)
                .into_iter()
                .chain(
                    crate::crd::compat::removed_stored_versions(&live, &desired)
                        .into_iter()
                        .map(|v| format!("version {v} removed while objects may be stored in it")),
                )
                .collect(),
        },
        None => SchemaPlan {
            changed: true,
            breaking: Vec::new(),
        },
    })
}

fn print_plan(plan: &Plan) {
    use crate::rollout::plan::Change;
    let plans = &plan.instances;
    println!("module {}: {} instance(s)", plan.module, plans.len());
    match (plan.schema.changed, plan.schema.breaking.is_empty()) {
        (false, _) => println!("schema: unchanged"),
        (true, true) => println!("schema: changes, none breaking"),
        (true, false) => println!("schema: refused, breaking: {}", plan.schema.breaking.join("; ")),
    }
    if plan.summary.destructive > 0 {
        println!(
            "approval: {} deletion(s) or replacement(s) of protected kinds wait for {}={}",
            plan.summary.destructive,
            crate::api::names::APPROVAL_ANNOTATION,
            plan.module
        );
    }
    println!("{:<40} {:<8} {:<40} DETAIL", "INSTANCE", "CHANGE", "OBJECT");
    for p in plans {
        let instance = format!("{}/{}", p.namespace, p.name);
        if let Some(error) = &p.error {
            println!(
                "{instance:<40} {:<8} {:<40} {}",
                "FAILS",
                "-",
                error.lines().next().unwrap_or_default()
            );
        }
        for v in &p.violations {
            println!(
                "{instance:<40} {:<8} {:<40} {:?}: {}",
                "POLICY", v.path, v.severity, v.message
            );
        }
        for c in &p.changes {
            let (what, object, detail) = match c {
                Change::Create { object } => ("create", object, String::new()),
                Change::Update { object, paths } => ("update", object, paths.join(", ")),
                Change::Delete { object } => ("delete", object, String::new()),
                Change::Replace { object, why } => ("replace", object, why.clone()),
                Change::Refused { object, why } => ("refused", object, why.clone()),
            };
            println!("{instance:<40} {what:<8} {:<40} {detail}", object.to_string());
        }
        for r in &p.reads {
            println!(
                "{instance:<40} {:<8} {:<40} {}",
                "read",
                r.object.to_string(),
                r.observed
            );
        }
        if p.error.is_none() && p.changes.is_empty() && p.violations.is_empty() && p.reads.is_empty() {
            println!("{instance:<40} {:<8} {:<40}", "none", "-");
        }
    }
    if !plan.versions.is_empty() {
        println!();
        println!("{:<40} {:<10} SPEC", "INSTANCE", "VERSION");
        for (instance, versions) in &plan.versions {
            for (version, spec) in versions {
                let spec = match spec {
                    SpecInVersion::Spec(spec) => spec.to_string(),
                    SpecInVersion::Error(e) => format!("fails: {}", e.lines().next().unwrap_or_default()),
                };
                println!("{instance:<40} {version:<10} {spec}");
            }
        }
    }
}

/// `pequod publish`: pushes a module and prints `<reference>@<digest>`.
pub async fn publish(module: &str, reference: &str, insecure: bool) -> Result<(), CommandError> {
    use crate::source::credentials::RegistryCredentials;
    use crate::source::oci::Registries;
    use crate::source::reference::OciReference;

    let (files, _) = load_module_files(module)?;
    let parsed = OciReference::parse(reference).map_err(CommandError::new)?;
    if parsed.digest.is_some() {
        return Err(CommandError::new("publish to a tag; the registry assigns the digest"));
    }
    let auth = match (
        std::env::var("PEQUOD_REGISTRY_USERNAME"),
        std::env::var("PEQUOD_REGISTRY_PASSWORD"),
    ) {
        (Ok(username), Ok(password)) => RegistryCredentials::Basic { username, password },
        _ => RegistryCredentials::Anonymous,
    };
    let registries = Registries {
        insecure: if insecure {
            vec![parsed.registry.clone()]
        } else {
            Vec::new()
        },
        timeout: Duration::from_secs(60),
        // The administrator's own push: no Transform chose the host.
        proxy: None,
    };
    let digest = registries
        .publish(&parsed.to_client_reference(None), &files, &auth)
        .await
        .map_err(CommandError::new)?;
    println!("{}/{}@{digest}", parsed.registry, parsed.repository);
    Ok(())
}

fn renderer(cue: &CueArgs) -> Result<Renderer, CommandError> {
    let metrics = Arc::new(Metrics::new().map_err(CommandError::new)?);
    let cli = cue.runner();
    Ok(Renderer::new(cli, RendererConfig::new(&cue.cache_dir), metrics))
}

fn print(value: &impl serde::Serialize, format: OutputFormat) -> Result<(), CommandError> {
    let text = match format {
        OutputFormat::Yaml => serde_yaml::to_string(value).map_err(CommandError::new)?,
        OutputFormat::Json => serde_json::to_string_pretty(value).map_err(CommandError::new)? + "\n",
    };
    print!("{text}");
    Ok(())
}

/// The instance in the YAML file `input`, and its metadata (a name is required).
fn read_instance(input: &Path) -> Result<(Value, ObjectMeta), CommandError> {
    let text =
        std::fs::read_to_string(input).map_err(|e| CommandError::new(format!("reading {}: {e}", input.display())))?;
    let instance: Value =
        serde_yaml::from_str(&text).map_err(|e| CommandError::new(format!("{} is not YAML: {e}", input.display())))?;
    let meta: ObjectMeta = serde_json::from_value(instance.get("metadata").cloned().unwrap_or_default())
        .map_err(|e| CommandError::new(format!("{}: metadata: {e}", input.display())))?;
    if meta.name.as_deref().unwrap_or_default().is_empty() {
        return Err(CommandError::new(format!(
            "{}: metadata.name is required",
            input.display()
        )));
    }
    Ok((instance, meta))
}

/// `--settings`: a YAML or JSON map as a Transform's `spec.settings` (dotted paths to strings
/// or integers); none is empty.
fn read_settings(path: Option<&Path>) -> Result<crate::api::Settings, CommandError> {
    let Some(path) = path else {
        return Ok(Default::default());
    };
    let text =
        std::fs::read_to_string(path).map_err(|e| CommandError::new(format!("reading {}: {e}", path.display())))?;
    let settings: Option<crate::api::Settings> = serde_yaml::from_str(&text).map_err(|e| {
        CommandError::new(format!(
            "{}: settings are a map of dotted paths to strings or integers: {e}",
            path.display()
        ))
    })?;
    Ok(settings.unwrap_or_default())
}

/// Prints the ResourceGraph `module` renders for the instance in `input`.
pub async fn render(
    module: &str,
    input: &Path,
    settings: Option<&Path>,
    format: OutputFormat,
    cue: &CueArgs,
) -> Result<(), CommandError> {
    let (files, platform) = load_module_files(module)?;
    let files = files
        .with_settings(&read_settings(settings)?)
        .map_err(CommandError::new)?;
    let (instance, meta) = read_instance(input)?;
    let spec = instance
        .get("spec")
        .cloned()
        .unwrap_or_else(|| Value::Object(Default::default()));

    let renderer = renderer(cue)?;
    let module = renderer.load(files, &platform).await.map_err(CommandError::new)?;
    let schema = renderer.schema(&module).await.map_err(CommandError::new)?;
    let render_input = render_input(&meta, &spec);
    let hash = render_hash(&module.digest, &input_hash(&render_input));
    let output = renderer
        .render(&module, render_input)
        .await
        .map_err(CommandError::new)?;

    let str_field = |key: &str| instance.get(key).and_then(Value::as_str).map(str::to_string);
    let kind = str_field("kind")
        .or_else(|| schema.metadata.kind.clone())
        .unwrap_or_else(|| crate::crd::kind_from_name(&platform));
    let instance_ref = InstanceRef {
        api_version: str_field("apiVersion").unwrap_or_else(|| {
            format!(
                "{}/{}",
                crate::api::DEFAULT_GENERATED_GROUP,
                crate::api::DEFAULT_GENERATED_VERSION
            )
        }),
        kind,
        name: meta.name.clone().unwrap_or_default(),
        namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
        uid: meta.uid.clone(),
    };
    let graph = resource_graph(&instance_ref, &platform, &hash, &output, Time(jiff::Timestamp::now()));
    print(&graph, format)?;

    let mut blocked = false;
    for v in &output.violations {
        eprintln!("{}: {}: {}", v.severity.as_str(), v.path, v.message);
        blocked |= v.severity == Severity::Error;
    }
    if blocked {
        return Err(CommandError {
            message: "policy violations of severity Error block this graph".into(),
            code: EXIT_POLICY_VIOLATION,
        });
    }
    Ok(())
}

/// The generated kind `pequod schema` prints: the Transform's name (else the module's), group
/// and version.
pub struct KindParams<'a> {
    pub name: Option<&'a str>,
    pub group: &'a str,
    pub version: &'a str,
}

/// Prints the CRD a Transform named `name` would generate from `module`.
pub async fn schema(
    module: &str,
    KindParams { name, group, version }: KindParams<'_>,
    settings: Option<&Path>,
    format: OutputFormat,
    cue: &CueArgs,
) -> Result<(), CommandError> {
    let (files, platform) = load_module_files(module)?;
    let files = files
        .with_settings(&read_settings(settings)?)
        .map_err(CommandError::new)?;
    let renderer = renderer(cue)?;
    let module = renderer.load(files, &platform).await.map_err(CommandError::new)?;
    let schema = renderer.schema(&module).await.map_err(CommandError::new)?;
    let transform_name = name.unwrap_or(&platform);
    let names = kind_names(transform_name, &schema, &[]).map_err(CommandError::new)?;
    // The operator names its webhook Service and adds its CA; offline there is neither.
    let endpoint = crate::conversion::WebhookEndpoint::Service {
        namespace: "pequod-system".into(),
        name: "pequod-webhook-service".into(),
    };
    let path = crate::conversion::conversion_path("default", transform_name, &module.digest);
    let crd = build_crd(
        &names,
        &schema,
        &CrdParams {
            group,
            version,
            categories: &[],
            transform_name,
            transform_namespace: "default",
            conversion: Some(endpoint.client_config(&path, "")),
        },
    );
    print(&crd, format)
}
