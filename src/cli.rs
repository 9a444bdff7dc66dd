//! Command line: run mode (the operator) and the offline subcommands, and [`Cli::run`], the
//! program `main` starts.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::commands::{self, CommandError};

use crate::runtime::server::BindAddress;
use crate::runtime::telemetry::{LogEncoder, LogLevel};

/// Pequod turns CUE modules into self-service Kubernetes APIs.
///
/// Without a subcommand it runs the operator.
#[derive(Parser, Debug)]
#[command(name = "pequod", version, about, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Subcommand, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Print the CustomResourceDefinitions of Pequod's own kinds as YAML.
    Crd {
        /// Write one file per CRD (`<group>_<plural>.yaml`) into this folder instead of printing.
        #[arg(long)]
        output_dir: Option<PathBuf>,
    },
    /// Render an instance through a module and print the ResourceGraph (no cluster needed).
    /// Exits 3 when a policy violation of severity Error blocks the graph.
    Render {
        /// A folder of .cue files, or the name of an embedded module (database, webapp, webservice, worker).
        #[arg(long)]
        module: String,
        /// YAML file with the instance (apiVersion, kind, metadata, spec).
        #[arg(long)]
        input: PathBuf,
        /// YAML or JSON file with the platform's settings, as a Transform's `spec.settings`
        /// (for example `provider: gcp`, `gcp.location: EU`); the module reads them as `#Settings`.
        #[arg(long)]
        settings: Option<PathBuf>,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Yaml)]
        output: OutputFormat,
        #[command(flatten)]
        cue: CueArgs,
    },
    /// Print the CRD a Transform would generate from a module (no cluster needed).
    Schema {
        /// A folder of .cue files, or the name of an embedded module (database, webapp, webservice, worker).
        #[arg(long)]
        module: String,
        /// Name of the Transform; the kind comes from it when the module has no #Metadata.kind.
        #[arg(long)]
        name: Option<String>,
        /// API group of the generated CRD.
        #[arg(long, default_value = "pequod.io")]
        group: String,
        /// API version of the generated CRD.
        #[arg(long, default_value = "v1alpha1")]
        version: String,
        /// YAML or JSON file with the platform's settings, as a Transform's `spec.settings`.
        #[arg(long)]
        settings: Option<PathBuf>,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Yaml)]
        output: OutputFormat,
        #[command(flatten)]
        cue: CueArgs,
    },
    /// Print the RBAC a Transform needs, for an administrator to apply when the manager does not
    /// write RBAC itself (`--generate-rbac=false`). Reads the Transform from the cluster of the
    /// current kubeconfig.
    Rbac {
        /// The Transform, as NAMESPACE/NAME.
        transform: String,
        /// The manager's service account.
        #[arg(long, default_value = "pequod-controller-manager")]
        service_account: String,
        /// The manager's namespace.
        #[arg(long, default_value = "pequod-system")]
        service_account_namespace: String,
    },
    /// Show what a module would change for every instance of a Transform, before it is
    /// rolled out: objects created, updated (with the changed fields), replaced and deleted,
    /// policy violations, and instances that would fail to render. Reads the Transform, its
    /// instances and their graphs from the cluster of the current kubeconfig; changes nothing.
    Plan {
        /// The Transform, as NAMESPACE/NAME.
        #[arg(long)]
        transform: String,
        /// The candidate module: a folder of .cue files, or the name of an embedded module.
        #[arg(long)]
        module: String,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = PlanFormat::Table)]
        output: PlanFormat,
        #[command(flatten)]
        cue: CueArgs,
    },
    /// Push a module to an OCI registry (one tar+gzip layer) and print its digest.
    /// Credentials come from PEQUOD_REGISTRY_USERNAME and PEQUOD_REGISTRY_PASSWORD.
    Publish {
        /// A folder of .cue files, or the name of an embedded module (database, webapp, webservice, worker).
        #[arg(long)]
        module: String,
        /// Where to push: registry/repository:tag.
        reference: String,
        /// Reach the registry over plain HTTP.
        #[arg(long)]
        insecure: bool,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlanFormat {
    Table,
    Json,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    Yaml,
    Json,
}

/// How cue is run.
#[derive(Args, Debug, Clone)]
pub struct CueArgs {
    /// The cue binary used to load and render modules.
    #[arg(long, env = "PEQUOD_CUE_BINARY", default_value = "cue")]
    pub cue_binary: PathBuf,

    /// Seconds one cue invocation may take before it is killed.
    #[arg(long, env = "PEQUOD_CUE_TIMEOUT", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub cue_timeout: u64,

    /// Most cue processes running at once.
    #[arg(long, env = "PEQUOD_CUE_MAX_PROCESSES", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub cue_max_processes: u16,

    /// Most memory one cue process may allocate, in MiB (its data segment, `RLIMIT_DATA`):
    /// an input whose evaluation needs more fails alone, with reason `CueMemoryLimit`. Keep
    /// `--cue-max-processes` times this, plus about 128 MiB, under the container's limit.
    #[arg(long, env = "PEQUOD_CUE_MEMORY_LIMIT_MB", default_value_t = crate::cue::process::DEFAULT_MEMORY_LIMIT_MIB, value_parser = clap::value_parser!(u64).range(64..=65_536))]
    pub cue_memory_limit_mb: u64,

    /// Folder for loaded modules and cue's scratch files.
    #[arg(long, env = "PEQUOD_CACHE_DIR", default_value = "/tmp/pequod-cache")]
    pub cache_dir: PathBuf,
}

/// How git and OCI modules are fetched and cached.
#[derive(Args, Debug, Clone)]
pub struct SourceArgs {
    /// Most megabytes of fetched git and OCI modules kept under the cache folder.
    #[arg(long, env = "PEQUOD_CACHE_SIZE_MB", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub cache_size_mb: u64,

    /// Hours a tag or branch resolution stands in for the remote when it cannot be reached.
    #[arg(long, env = "PEQUOD_CACHE_TTL_HOURS", default_value_t = 24, value_parser = clap::value_parser!(u64).range(0..=8760))]
    pub cache_ttl_hours: u64,

    /// The git binary used for git sources.
    #[arg(long, env = "PEQUOD_GIT_BINARY", default_value = "git")]
    pub git_binary: PathBuf,

    /// Registries and git servers (host or host:port, comma-separated) reached over plain
    /// HTTP (or git://) instead of HTTPS.
    #[arg(long, env = "PEQUOD_INSECURE_REGISTRIES", value_delimiter = ',')]
    pub insecure_registries: Vec<String>,

    /// Let Transforms fetch git modules from the operator's own file system (`file://`).
    #[arg(long, env = "PEQUOD_ALLOW_LOCAL_SOURCES", default_value_t = false, num_args = 0..=1, default_missing_value = "true")]
    pub allow_local_sources: bool,

    /// Seconds between resolutions of a Transform's git branch or OCI tag, to notice it moved.
    #[arg(long, env = "PEQUOD_MODULE_POLL_INTERVAL", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub module_poll_interval: u64,

    /// Seconds one git command or registry request may take.
    #[arg(long, env = "PEQUOD_FETCH_TIMEOUT", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub fetch_timeout: u64,
}

/// Flags of the operator. Every flag can also be set through the environment variable shown.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Address of the metrics endpoint (`:8443`, `127.0.0.1:8443`, or `0` to disable).
    #[arg(long, env = "PEQUOD_METRICS_BIND_ADDRESS", default_value = ":8443")]
    pub metrics_bind_address: BindAddress,

    /// Serve metrics over HTTPS, to clients whose bearer token may get /metrics (checked with
    /// TokenReview and SubjectAccessReview).
    #[arg(long, env = "PEQUOD_METRICS_SECURE", default_value_t = false, num_args = 0..=1, default_missing_value = "true")]
    pub metrics_secure: bool,

    /// Folder with tls.crt and tls.key for secure metrics; without it a self-signed
    /// certificate is generated at start-up.
    #[arg(long, env = "PEQUOD_METRICS_CERT_DIR")]
    pub metrics_cert_dir: Option<std::path::PathBuf>,

    /// With `--metrics-secure`: accept only bearer tokens meant for one of these audiences
    /// (comma-separated; for example a projected token with audience `pequod-metrics`). Empty:
    /// any token the apiserver accepts for itself.
    #[arg(long, env = "PEQUOD_METRICS_TOKEN_AUDIENCES", value_delimiter = ',')]
    pub metrics_token_audiences: Vec<String>,

    /// Address of the /healthz and /readyz endpoints (`0` to disable).
    #[arg(long, env = "PEQUOD_HEALTH_PROBE_BIND_ADDRESS", default_value = ":8081")]
    pub health_probe_bind_address: BindAddress,

    /// Address of the conversion webhook (HTTPS), which converts instances between the
    /// versions of modules that declare several (`:9443`, `127.0.0.1:9443`, or `0` to disable
    /// it: Transforms whose module declares several versions are then refused).
    #[arg(long, env = "PEQUOD_WEBHOOK_BIND_ADDRESS", default_value = ":9443")]
    pub webhook_bind_address: BindAddress,

    /// The Service, in the operator's namespace, through which the apiserver reaches the
    /// conversion webhook (on port 443).
    #[arg(long, env = "PEQUOD_WEBHOOK_SERVICE", default_value = crate::api::names::WEBHOOK_SERVICE, value_parser = dns_label)]
    pub webhook_service: String,

    /// `https://HOST[:PORT]` at which the apiserver reaches the conversion webhook instead of
    /// the Service: for an operator running outside the cluster (`make run`).
    #[arg(long, env = "PEQUOD_WEBHOOK_URL")]
    pub webhook_url: Option<crate::conversion::WebhookUrl>,

    /// Seconds the conversion webhook's serving certificate is valid; it is re-issued when a
    /// third of that is left.
    #[arg(long, env = "PEQUOD_WEBHOOK_CERT_VALIDITY", default_value_t = DEFAULT_WEBHOOK_CERT_VALIDITY, value_parser = clap::value_parser!(u64).range(60..=MAX_WEBHOOK_CERT_VALIDITY))]
    pub webhook_cert_validity: u64,

    /// Elect a leader through a Lease so that only one replica reconciles.
    #[arg(long, env = "PEQUOD_LEADER_ELECT", default_value_t = false, num_args = 0..=1, default_missing_value = "true")]
    pub leader_elect: bool,

    /// Name of the leader-election Lease.
    #[arg(long, env = "PEQUOD_LEADER_ELECTION_ID", default_value = "pequod-leader")]
    pub leader_election_id: String,

    /// Namespace of the leader-election Lease (default: the pod's namespace, else pequod-system).
    #[arg(long, env = "PEQUOD_LEADER_ELECTION_NAMESPACE")]
    pub leader_election_namespace: Option<String>,

    /// Seconds a leader's lease holds without renewal before a standby takes over.
    #[arg(long, env = "PEQUOD_LEADER_ELECT_LEASE_DURATION", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub leader_elect_lease_duration: u64,

    /// Seconds the leader keeps trying to renew before it stops leading (and exits).
    #[arg(long, env = "PEQUOD_LEADER_ELECT_RENEW_DEADLINE", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub leader_elect_renew_deadline: u64,

    /// Seconds between attempts to acquire or renew the lease.
    #[arg(long, env = "PEQUOD_LEADER_ELECT_RETRY_PERIOD", default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub leader_elect_retry_period: u64,

    /// Split ResourceGraphs among the replicas in this many shards, each held through a Lease
    /// (1: the leader reconciles every graph). Needs `--leader-elect`.
    #[arg(long, env = "PEQUOD_SHARDS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=crate::runtime::shards::MAX_SHARDS as i64))]
    pub shards: u32,

    /// Log level.
    #[arg(long, env = "PEQUOD_LOG_LEVEL", value_enum, default_value_t = LogLevel::Info)]
    pub zap_log_level: LogLevel,

    /// Log format.
    #[arg(long, env = "PEQUOD_LOG_ENCODER", value_enum, default_value_t = LogEncoder::Json)]
    pub zap_encoder: LogEncoder,

    #[command(flatten)]
    pub cue: CueArgs,

    #[command(flatten)]
    pub sources: SourceArgs,

    /// Namespaces whose Transforms are trusted: they may have a ClusterRole
    /// (`rbacScope: Cluster`), cluster-scoped objects, and RBAC, admission, CRD and APIService
    /// kinds. Transforms elsewhere get a Role and ordinary namespaced objects in their own
    /// namespace. Default: the operator's own namespace; `*` trusts every namespace.
    #[arg(long, env = "PEQUOD_TRUSTED_TRANSFORM_NAMESPACES", value_delimiter = ',')]
    pub trusted_transform_namespaces: Vec<String>,

    /// The service account, in a graph's own namespace, that hand-written ResourceGraphs and
    /// graphs of Transforms outside the trusted namespaces act as when they name none
    /// (`spec.serviceAccountName`): the apiserver authorizes their every read and write as it.
    #[arg(long, env = "PEQUOD_DEFAULT_SERVICE_ACCOUNT", default_value = "default", value_parser = service_account_name)]
    pub default_service_account: String,

    /// Kinds (comma-separated) whose values, like a Secret's, never flow out of a graph: only
    /// their identity fields may be referenced, output or gated on. Secrets always are.
    #[arg(long, env = "PEQUOD_SENSITIVE_KINDS", value_delimiter = ',')]
    pub sensitive_kinds: Vec<String>,

    /// Graphs may not name a service account other than `--default-service-account`.
    #[arg(long, env = "PEQUOD_LOCK_SERVICE_ACCOUNT", default_value_t = false, num_args = 0..=1, default_missing_value = "true")]
    pub lock_service_account: bool,

    /// Write each Transform's Role or ClusterRole (needs `escalate` and `bind` on roles). With
    /// `false` an administrator applies what `pequod rbac NAMESPACE/NAME` prints, and a
    /// Transform waits with `RBACConfigured=False` and the missing rules until it exists.
    #[arg(long, env = "PEQUOD_GENERATE_RBAC", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub generate_rbac: bool,

    /// Most objects each controller reconciles at the same time.
    #[arg(long, env = "PEQUOD_MAX_CONCURRENT_RECONCILES", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub max_concurrent_reconciles: u16,

    /// Most nodes of one ResourceGraph applied at the same time.
    #[arg(long, env = "PEQUOD_APPLY_CONCURRENCY", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub apply_concurrency: u16,
}

impl CueArgs {
    /// The cue runner these flags describe.
    pub fn runner(&self) -> crate::cue::CueCli {
        crate::cue::CueCli::new(
            &self.cue_binary,
            std::time::Duration::from_secs(self.cue_timeout),
            self.cue_max_processes.into(),
        )
        .with_memory_limit(self.cue_memory_limit_mb * 1024 * 1024)
    }
}

/// Default `--webhook-cert-validity`: 90 days.
const DEFAULT_WEBHOOK_CERT_VALIDITY: u64 = crate::conversion::certificate::DEFAULT_SERVING_VALIDITY.as_secs();
/// Longest `--webhook-cert-validity`: 5 years, half the CA's life.
const MAX_WEBHOOK_CERT_VALIDITY: u64 = 5 * 365 * 24 * 3600;

/// A Service name: a DNS label (RFC 1035), as the apiserver requires.
fn dns_label(value: &str) -> Result<String, String> {
    let valid = !value.is_empty()
        && value.len() <= 63
        && value.starts_with(|c: char| c.is_ascii_lowercase())
        && !value.ends_with('-')
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if valid {
        Ok(value.to_string())
    } else {
        Err(format!("{value:?} is not a Service name (a DNS label)"))
    }
}

/// A service account name: a DNS subdomain, as the apiserver requires.
fn service_account_name(value: &str) -> Result<String, String> {
    if crate::naming::is_dns_name(value) {
        Ok(value.to_string())
    } else {
        Err(format!("{value:?} is not a service account name (a DNS subdomain)"))
    }
}

/// Stack of each runtime thread. Reconcile futures are large (unoptimized builds copy them
/// through several frames); tokio's 2 MiB default left little headroom.
const THREAD_STACK_BYTES: usize = 8 * 1024 * 1024;

impl Cli {
    /// The program: parses the command line and runs the subcommand, or the operator.
    pub fn run() -> ExitCode {
        let cli = Self::parse();
        match tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_stack_size(THREAD_STACK_BYTES)
            .build()
        {
            Ok(runtime) => runtime.block_on(cli.execute()),
            Err(e) => {
                eprintln!("error: cannot start the async runtime: {e}");
                ExitCode::FAILURE
            }
        }
    }

    async fn execute(self) -> ExitCode {
        let Some(command) = self.command else {
            return run_operator(self.run).await;
        };
        match command.execute().await {
            Ok(()) => ExitCode::SUCCESS,
            Err(CommandError { message, code }) => {
                eprintln!("error: {message}");
                ExitCode::from(code)
            }
        }
    }
}

impl Command {
    async fn execute(self) -> Result<(), CommandError> {
        match self {
            Self::Crd { output_dir } => commands::crd(output_dir.as_deref()),
            Self::Render {
                module,
                input,
                settings,
                output,
                cue,
            } => commands::render(&module, &input, settings.as_deref(), output, &cue).await,
            Self::Schema {
                module,
                name,
                group,
                version,
                settings,
                output,
                cue,
            } => {
                let kind = commands::KindParams {
                    name: name.as_deref(),
                    group: &group,
                    version: &version,
                };
                commands::schema(&module, kind, settings.as_deref(), output, &cue).await
            }
            Self::Rbac {
                transform,
                service_account,
                service_account_namespace,
            } => commands::rbac(&transform, service_account, service_account_namespace).await,
            Self::Plan {
                transform,
                module,
                output,
                cue,
            } => commands::plan(&transform, &module, output, &cue).await,
            Self::Publish {
                module,
                reference,
                insecure,
            } => commands::publish(&module, &reference, insecure).await,
        }
    }
}

async fn run_operator(args: RunArgs) -> ExitCode {
    crate::runtime::telemetry::init(args.zap_log_level, args.zap_encoder);
    match crate::operator::run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "pequod stopped");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_default_service_account_must_be_a_dns_subdomain() {
        for good in ["default", "pequod-graphs", "a.b"] {
            assert_eq!(super::service_account_name(good).as_deref(), Ok(good));
        }
        for bad in ["", "Default", "-a", "a-", "a b", "a:b", &"a".repeat(64)] {
            assert!(super::service_account_name(bad).is_err(), "{bad:?}");
        }
    }

    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_match_the_operations_guide() {
        let cli = Cli::try_parse_from(["pequod"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.run.metrics_bind_address, BindAddress::AllInterfaces(8443));
        assert_eq!(cli.run.health_probe_bind_address, BindAddress::AllInterfaces(8081));
        assert_eq!(cli.run.metrics_bind_address.to_string(), ":8443");
        assert_eq!(cli.run.webhook_bind_address, BindAddress::AllInterfaces(9443));
        assert_eq!(cli.run.webhook_service, "pequod-webhook-service");
        assert_eq!(cli.run.webhook_url, None);
        assert_eq!(cli.run.webhook_cert_validity, 90 * 24 * 3600);
        assert!(!cli.run.leader_elect);
        assert_eq!(cli.run.zap_log_level, LogLevel::Info);
        assert_eq!(cli.run.zap_encoder, LogEncoder::Json);
    }

    #[test]
    fn go_style_flags_parse() {
        let cli = Cli::try_parse_from([
            "pequod",
            "--leader-elect",
            "--metrics-bind-address=127.0.0.1:9000",
            "--health-probe-bind-address=0",
            "--zap-log-level=debug",
            "--zap-encoder=console",
        ])
        .unwrap();
        assert!(cli.run.leader_elect);
        assert_eq!(cli.run.metrics_bind_address.to_string(), "127.0.0.1:9000");
        assert_eq!(cli.run.health_probe_bind_address, BindAddress::Disabled);
        assert_eq!(cli.run.zap_log_level, LogLevel::Debug);
        assert_eq!(cli.run.zap_encoder, LogEncoder::Console);
        let explicit = Cli::try_parse_from(["pequod", "--leader-elect=false"]).unwrap();
        assert!(!explicit.run.leader_elect);
    }

    #[test]
    fn bind_addresses_parse() {
        let parse = |s: &str| s.parse::<BindAddress>();
        assert_eq!(parse(":8443"), Ok(BindAddress::AllInterfaces(8443)));
        assert_eq!(parse(" :0 "), Ok(BindAddress::AllInterfaces(0)));
        assert_eq!(parse("0"), Ok(BindAddress::Disabled));
        assert_eq!(
            parse("127.0.0.1:9000"),
            Ok(BindAddress::Exact("127.0.0.1:9000".parse().unwrap()))
        );
        assert_eq!(
            parse("[::1]:9000"),
            Ok(BindAddress::Exact("[::1]:9000".parse().unwrap()))
        );
        assert_eq!(parse("0.0.0.0:8081").unwrap().to_string(), "0.0.0.0:8081");
        assert_eq!(parse("[::]:8081").unwrap().to_string(), "[::]:8081");
        for bad in ["nonsense", ":", ":http", ":65536", "localhost:80", "::1:80", "8443"] {
            assert!(parse(bad).is_err(), "{bad} must be refused");
        }
    }

    #[test]
    fn webhook_flags_parse_and_bad_ones_are_refused() {
        let cli = Cli::try_parse_from([
            "pequod",
            "--webhook-bind-address=0",
            "--webhook-service=my-hook",
            "--webhook-url=https://127.0.0.1:9443",
            "--webhook-cert-validity=60",
        ])
        .unwrap();
        assert_eq!(cli.run.webhook_bind_address, BindAddress::Disabled);
        assert_eq!(cli.run.webhook_service, "my-hook");
        assert_eq!(cli.run.webhook_url.unwrap().base, "https://127.0.0.1:9443");
        assert_eq!(cli.run.webhook_cert_validity, 60);
        for bad in [
            "--webhook-cert-validity=59",
            "--webhook-url=http://127.0.0.1:9443",
            "--webhook-service=My_Hook",
            "--webhook-service=hook.example",
        ] {
            assert!(Cli::try_parse_from(["pequod", bad]).is_err(), "{bad} must be refused");
        }
    }

    #[test]
    fn bad_values_are_refused() {
        assert!("nonsense".parse::<BindAddress>().is_err());
        assert!(Cli::try_parse_from(["pequod", "--zap-log-level=loud"]).is_err());
        assert!(Cli::try_parse_from(["pequod", "--max-concurrent-reconciles=0"]).is_err());
    }
}
