//! The renderer service: loads modules, extracts their schema, and renders inputs through
//! cue with caching and batching, so that cue runs as rarely as possible.

use crate::error::ErrorCategory;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value;
use tokio::sync::{OnceCell, mpsc, oneshot};

use super::batch::{self, RenderError, RenderOutput};
use super::conversion::ConversionCache;
use super::module::{Module, ModuleFiles, ModuleStore};
use super::versions::{self, ApiVersion};
use super::{CueCli, CueError, crd_schema_from_openapi};
use crate::lru::Lru;
use crate::metrics::Metrics;

/// Tuning of the renderer.
#[derive(Debug, Clone)]
pub struct RendererConfig {
    /// Folder for materialized modules (`PEQUOD_CACHE_DIR`).
    pub cache_dir: PathBuf,
    /// Most render results kept in memory.
    pub max_cached_renders: usize,
    /// Most bytes of render results kept in memory (as JSON).
    pub max_cached_bytes: u64,
    /// How long a batch waits for more renders of the same module before cue runs; while
    /// renders keep arriving within it, the batch keeps waiting, up to `max_batch_wait`.
    pub batch_window: Duration,
    /// Longest a batch waits for renders that keep arriving.
    pub max_batch_wait: Duration,
    /// Most inputs evaluated in one cue call.
    pub max_batch: usize,
    /// Most objects converted in one cue call: a conversion is far cheaper than a render, and
    /// a `kubectl get` of 500 instances should take one.
    pub max_conversion_batch: usize,
    /// Most conversion results kept in memory.
    pub max_cached_conversions: usize,
    /// Most bytes of conversion results kept in memory (as JSON).
    pub max_cached_conversion_bytes: u64,
}

impl RendererConfig {
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            cache_dir: cache_dir.into(),
            max_cached_renders: 10_000,
            // Held as JSON text. Steady state needs no render (an instance whose graph holds
            // its render is not rendered again), so the cache serves bursts (a batch's
            // duplicates and retries) and a rollout's moves after its plan.
            max_cached_bytes: 16 * 1024 * 1024,
            batch_window: Duration::from_millis(25),
            max_batch_wait: Duration::from_millis(500),
            max_batch: 200,
            max_conversion_batch: 1_000,
            max_cached_conversions: 10_000,
            max_cached_conversion_bytes: 32 * 1024 * 1024,
        }
    }
}

/// What a module declares about the kind it defines (`#Metadata`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModuleMetadata {
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub plural: Option<String>,
    #[serde(default)]
    pub short_names: Vec<String>,
    #[serde(default)]
    pub description: Option<String>,
    /// Columns `kubectl get` shows for the kind, after Pequod's Ready and Phase.
    #[serde(default)]
    pub printer_columns: Vec<PrinterColumn>,
    /// Readiness expressions (CEL over the live object, `self`) by node id: each becomes an
    /// `Expression` gate of that node in every render. Checked when the Transform is applied.
    #[serde(default)]
    pub ready_when: std::collections::BTreeMap<String, String>,
}

/// Most printer columns a module may add.
pub const MAX_PRINTER_COLUMNS: usize = 8;

/// A column of `kubectl get`, as in a CRD's `additionalPrinterColumns`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PrinterColumn {
    pub name: String,
    /// `string`, `integer`, `number`, `boolean` or `date`.
    #[serde(rename = "type")]
    pub type_: String,
    /// Where the value is, for example `.status.url`.
    pub json_path: String,
    #[serde(default)]
    pub description: Option<String>,
    /// 0 shows the column always; higher ones only with `-o wide`.
    #[serde(default)]
    pub priority: Option<i32>,
}

impl ModuleMetadata {
    /// Why the readiness expressions cannot be used, if they cannot.
    fn check_ready_when(&self) -> Result<(), String> {
        for (node, expression) in &self.ready_when {
            crate::readiness::check_expression(expression).map_err(|why| format!("readyWhen.{node}: {why}"))?;
        }
        Ok(())
    }

    /// Why the printer columns cannot go into a CRD, if they cannot.
    fn check_columns(&self) -> Result<(), String> {
        if self.printer_columns.len() > MAX_PRINTER_COLUMNS {
            return Err(format!(
                "{} printer columns; at most {MAX_PRINTER_COLUMNS} are allowed",
                self.printer_columns.len()
            ));
        }
        for c in &self.printer_columns {
            if c.name.is_empty() || c.name.len() > 64 {
                return Err(format!("printer column {:?}: a name of 1 to 64 characters", c.name));
            }
            if !["string", "integer", "number", "boolean", "date"].contains(&c.type_.as_str()) {
                return Err(format!(
                    "printer column {:?}: type {:?} is not string, integer, number, boolean or date",
                    c.name, c.type_
                ));
            }
            if !c.json_path.starts_with('.') || c.json_path.len() > 256 {
                return Err(format!(
                    "printer column {:?}: jsonPath {:?} must start with '.' (for example .status.url)",
                    c.name, c.json_path
                ));
            }
        }
        Ok(())
    }
}

/// The schema of a module's `#Input`, ready to become a CRD's `spec`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleSchema {
    pub metadata: ModuleMetadata,
    pub spec: Value,
    /// The schema of `#Status`, the module's own status fields, if it has one.
    pub status: Option<Value>,
    /// The versions `#Versions` declares, in priority order; empty without `#Versions`.
    pub versions: Vec<ApiVersion>,
}

pub type RenderResult = Result<Arc<RenderOutput>, RenderError>;
type SchemaCell = Arc<OnceCell<Result<Arc<ModuleSchema>, RenderError>>>;

struct Job {
    key: String,
    input: Value,
    reply: oneshot::Sender<RenderResult>,
}

/// Renders platform modules through the cue CLI. Cheap to clone.
#[derive(Clone)]
pub struct Renderer {
    pub(super) inner: Arc<Inner>,
}

pub(super) struct Inner {
    pub(super) cli: CueCli,
    pub(super) store: ModuleStore,
    pub(super) metrics: Arc<Metrics>,
    pub(super) config: RendererConfig,
    schemas: Mutex<HashMap<String, SchemaCell>>,
    renders: Mutex<RenderCache>,
    queues: Mutex<HashMap<String, mpsc::UnboundedSender<Job>>>,
    pub(super) conversions: Mutex<ConversionCache>,
}

impl Renderer {
    pub fn new(cli: CueCli, config: RendererConfig, metrics: Arc<Metrics>) -> Self {
        let store = ModuleStore::new(&config.cache_dir);
        let renders = RenderCache::new(config.max_cached_renders, config.max_cached_bytes);
        let conversions = ConversionCache::new(config.max_cached_conversions, config.max_cached_conversion_bytes);
        Self {
            inner: Arc::new(Inner {
                cli,
                store,
                metrics,
                config,
                schemas: Mutex::default(),
                renders: Mutex::new(renders),
                queues: Mutex::default(),
                conversions: Mutex::new(conversions),
            }),
        }
    }

    /// Writes the module to the cache folder (once per digest).
    pub async fn load(&self, files: ModuleFiles, platform: &str) -> Result<Module, RenderError> {
        let store = self.inner.store.clone();
        let platform = platform.to_string();
        tokio::task::spawn_blocking(move || store.materialize(&files, &platform))
            .await
            .map_err(|e| RenderError::InvalidModule {
                message: format!("loading module: {e}"),
            })?
            .map_err(RenderError::from)
    }

    /// A module loaded before, by its content digest (see [`ModuleStore::find`]).
    pub async fn find(&self, digest: &str, platform: &str) -> Option<Module> {
        let store = self.inner.store.clone();
        let (digest, platform) = (digest.to_string(), platform.to_string());
        tokio::task::spawn_blocking(move || store.find(&digest, &platform))
            .await
            .ok()
            .flatten()
    }

    /// The CRD schema of the module's `#Input` and its `#Metadata`, computed once per digest.
    pub async fn schema(&self, module: &Module) -> Result<Arc<ModuleSchema>, RenderError> {
        let cell = {
            let mut schemas = lock(&self.inner.schemas);
            schemas.entry(module.digest.clone()).or_default().clone()
        };
        let result = cell
            .get_or_try_init(|| async {
                // Boxed: the extraction's future is large, and callers' stacks need not hold it.
                match Box::pin(self.extract_schema(module)).await {
                    Ok(schema) => Ok(Ok(Arc::new(schema))),
                    // Transient failures leave the cell empty so the next call tries again.
                    Err(e) if e.is_transient() => Err(e),
                    Err(e) => Ok(Err(e)),
                }
            })
            .await?;
        result.clone()
    }

    async fn extract_schema(&self, module: &Module) -> Result<ModuleSchema, RenderError> {
        let cli = &self.inner.cli;
        let openapi = cli.run(&["def", "./schema", "--out", "openapi"], Some(&module.dir));
        // The meta package: #Metadata, and the flags of #Versions (whose names the schemas of
        // the versions need).
        let meta = async {
            if module.has_versions {
                versions::write_generated(&module.dir, versions::FLAGS_FILE, &versions::flags_source(module)).await?;
            } else if !module.has_metadata {
                return Ok(None);
            }
            match cli.run(&["export", "./meta", "--out", "json"], Some(&module.dir)).await {
                Ok(text) => Ok(Some(text)),
                Err(CueError::Failed { message, .. }) => Err(RenderError::InvalidModule {
                    message: versions::readable(&batch::clean_message(&message)),
                }),
                Err(e) => Err(e.into()),
            }
        };
        let settings = async {
            if !module.has_settings {
                return Ok(());
            }
            match cli
                .run(&["export", "./settingscheck", "--out", "json"], Some(&module.dir))
                .await
            {
                Ok(_) => Ok(()),
                Err(CueError::Failed { message, .. }) => Err(RenderError::InvalidSettings {
                    message: format!("#Settings: {}", batch::clean_message(&message)),
                }),
                Err(e) => Err(e.into()),
            }
        };
        let (openapi, meta, settings) = tokio::join!(openapi, Box::pin(meta), settings);
        settings?;
        let openapi = match openapi {
            Ok(text) => text,
            // The OpenAPI encoder reports some evaluation errors without a field or position
            // ("explicit error (_|_ literal) in source"); plain `def` of #Input names both.
            Err(CueError::Failed { message, .. }) => {
                let diagnosis = cli.run(&["def", "-e", "#Input", "./schema"], Some(&module.dir)).await;
                return Err(schema_error(match diagnosis {
                    Err(e @ CueError::Failed { .. }) => e,
                    _ => CueError::Failed { code: None, message },
                }));
            }
            Err(e) => return Err(schema_error(e)),
        };
        let openapi: Value = serde_json::from_str(&openapi).map_err(|e| RenderError::InvalidOutput {
            message: format!("cue printed invalid OpenAPI: {e}"),
        })?;
        let spec = crd_schema_from_openapi(&openapi, "Input")?;
        let status = if module.has_status {
            Some(status_schema(&openapi)?)
        } else {
            None
        };
        let meta = meta?.map(|text| parse_json(&text)).transpose()?;
        let metadata = match &meta {
            Some(meta) if module.has_metadata => parse_metadata(meta)?,
            _ => ModuleMetadata::default(),
        };
        metadata
            .check_columns()
            .and_then(|()| metadata.check_ready_when())
            .map_err(|message| RenderError::InvalidModule {
                message: format!("#Metadata: {message}"),
            })?;
        let versions = match &meta {
            Some(meta) if module.has_versions => {
                let declared = versions::declared_versions(meta)?;
                let openapi = Box::pin(versions::versions_openapi(cli, module, &declared)).await?;
                versions::api_versions(declared, &openapi, &spec)?
            }
            _ => Vec::new(),
        };
        Ok(ModuleSchema {
            metadata,
            spec,
            status,
            versions,
        })
    }

    /// Renders `input` (see [`batch::render_input`]) through `module`. Results, failures
    /// included, are cached by (module digest, input hash); renders of the same module that
    /// wait at the same time share one cue call.
    pub async fn render(&self, module: &Module, input: Value) -> RenderResult {
        let key = cache_key(&module.digest, &input);
        if let Some(hit) = self.cached(&key) {
            return hit;
        }
        let (reply, response) = oneshot::channel();
        let mut job = Job { key, input, reply };
        loop {
            let sender = self.queue(module);
            match sender.send(job) {
                Ok(()) => break,
                // The module's worker just retired; start a new one.
                Err(mpsc::error::SendError(returned)) => {
                    lock(&self.inner.queues).remove(&module.digest);
                    job = returned;
                }
            }
        }
        response.await.unwrap_or_else(|_| {
            Err(RenderError::CueUnavailable {
                message: "renderer stopped".into(),
            })
        })
    }

    /// Renders `input` afresh: its cached result, if any, is dropped first (a reconcile an
    /// instance's owner asked for).
    pub async fn render_afresh(&self, module: &Module, input: Value) -> RenderResult {
        let key = cache_key(&module.digest, &input);
        lock(&self.inner.renders).remove(&key, &self.inner.metrics);
        self.render(module, input).await
    }

    fn cached(&self, key: &str) -> Option<RenderResult> {
        // Parsed outside the lock: other renders' hits wait on it.
        let held = lock(&self.inner.renders).get(key);
        let hit = held.and_then(read_held);
        let metrics = &self.inner.metrics;
        match hit {
            Some(result) => {
                metrics.cue_cache_hits_total.inc();
                Some(result)
            }
            None => {
                metrics.cue_cache_misses_total.inc();
                None
            }
        }
    }

    fn queue(&self, module: &Module) -> mpsc::UnboundedSender<Job> {
        let mut queues = lock(&self.inner.queues);
        if let Some(sender) = queues.get(&module.digest) {
            return sender.clone();
        }
        let (sender, receiver) = mpsc::unbounded_channel();
        queues.insert(module.digest.clone(), sender.clone());
        tokio::spawn(run_worker(self.inner.clone(), module.clone(), receiver));
        sender
    }
}

fn schema_error(e: CueError) -> RenderError {
    match e {
        CueError::Failed { message, .. } => RenderError::InvalidModule {
            message: batch::clean_message(&message),
        },
        other => other.into(),
    }
}

fn cache_key(digest: &str, input: &Value) -> String {
    format!("{digest}/{}", batch::input_hash(input))
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// How long a module's worker waits for work before it retires.
const WORKER_IDLE: Duration = Duration::from_secs(60);

async fn run_worker(inner: Arc<Inner>, module: Module, mut jobs: mpsc::UnboundedReceiver<Job>) {
    loop {
        let first = match tokio::time::timeout(WORKER_IDLE, jobs.recv()).await {
            Ok(Some(job)) => job,
            Ok(None) => return,
            Err(_) => {
                let mut queues = lock(&inner.queues);
                if jobs.is_empty() {
                    queues.remove(&module.digest);
                    return;
                }
                continue;
            }
        };
        let batch = gather(first, &mut jobs, &inner.config).await;
        // One evaluation per distinct input; a result already cached answers at once.
        let mut waiting: BTreeMap<String, (Value, Vec<oneshot::Sender<RenderResult>>)> = BTreeMap::new();
        for job in batch {
            let hit = lock(&inner.renders).get(&job.key);
            if let Some(hit) = hit.and_then(read_held) {
                let _ = job.reply.send(hit);
                continue;
            }
            waiting
                .entry(job.key)
                .or_insert_with(|| (job.input, Vec::new()))
                .1
                .push(job.reply);
        }
        if waiting.is_empty() {
            continue;
        }
        let inputs: Vec<&Value> = waiting.values().map(|(input, _)| input).collect();
        let results = render_batch(&inner, &module, &inputs).await;
        for ((key, (_, replies)), result) in waiting.into_iter().zip(results) {
            let result = record(&inner, &module, result);
            if result.as_ref().err().is_none_or(|e| !e.is_transient())
                && let Some(held) = held(&result)
            {
                lock(&inner.renders).insert(key, held, &inner.metrics);
            }
            for reply in replies {
                let _ = reply.send(result.clone());
            }
        }
    }
}

/// The batch that starts with `first`: what arrives while renders keep coming (a window
/// without a new one ends it), up to the batch's size and longest wait. A burst of new
/// instances shares a few cue calls; a lone render waits one window.
async fn gather(first: Job, jobs: &mut mpsc::UnboundedReceiver<Job>, config: &RendererConfig) -> Vec<Job> {
    let started = tokio::time::Instant::now();
    let mut batch = vec![first];
    loop {
        tokio::time::sleep(config.batch_window).await;
        let before = batch.len();
        while batch.len() < config.max_batch {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        if batch.len() == before || batch.len() >= config.max_batch || started.elapsed() >= config.max_batch_wait {
            return batch;
        }
    }
}

fn record(inner: &Inner, module: &Module, result: Result<RenderOutput, RenderError>) -> RenderResult {
    let metrics = &inner.metrics;
    // Violations are counted by the instance controller when an instance's violations change;
    // a render (also one for a rollout plan) does not count them.
    if let Err(e) = &result {
        metrics
            .cue_render_errors_total
            .with_label_values(&[&module.platform, e.reason()])
            .inc();
    }
    result.map(Arc::new)
}

/// The module's `#Status` as a CRD schema, none of its fields one Pequod writes.
fn status_schema(openapi: &Value) -> Result<Value, RenderError> {
    let status = crd_schema_from_openapi(openapi, "Status")?;
    let fields = status.get("properties").and_then(Value::as_object);
    if let Some(reserved) = fields
        .into_iter()
        .flat_map(|f| f.keys())
        .find(|k| crate::api::RESERVED_STATUS_FIELDS.contains(&k.as_str()))
    {
        return Err(RenderError::Schema(super::SchemaError::new(
            "status",
            format!("#Status.{reserved} is a field Pequod writes; choose another name"),
        )));
    }
    Ok(status)
}

fn parse_json(text: &str) -> Result<Value, RenderError> {
    serde_json::from_str(text).map_err(|e| RenderError::InvalidOutput {
        message: format!("cue printed invalid JSON: {e}"),
    })
}

/// The module's `#Metadata`, from what `cue export ./meta` printed.
fn parse_metadata(value: &Value) -> Result<ModuleMetadata, RenderError> {
    serde_json::from_value(value.get("metadata").cloned().unwrap_or(Value::Null)).map_err(|e| {
        RenderError::InvalidModule {
            message: format!("#Metadata: {e}"),
        }
    })
}

/// Renders `inputs` in as few cue calls as possible: one for the whole batch; when cue
/// fails, the inputs its errors point at get those errors and the rest run again; a failure
/// that points at no input, a timeout or an oversized output halves the batch.
async fn render_batch(inner: &Inner, module: &Module, inputs: &[&Value]) -> Vec<Result<RenderOutput, RenderError>> {
    let mut results: Vec<Option<Result<RenderOutput, RenderError>>> = vec![None; inputs.len()];
    let mut pending: Vec<usize> = (0..inputs.len()).collect();
    while !pending.is_empty() {
        let batch: Vec<&Value> = pending.iter().map(|i| inputs[*i]).collect();
        match timed_cue_batch(inner, module, &batch).await {
            Ok(Ok(outputs)) => {
                for (k, output) in outputs.into_iter().enumerate() {
                    results[pending[k]] = Some(output);
                }
                pending.clear();
            }
            Ok(Err(e)) => fail_all(&mut pending, &mut results, &e),
            Err(CueError::Failed { message, .. }) => {
                let (per_input, _) = batch::attribute_errors(&message, pending.len());
                if per_input.is_empty() && pending.len() > 1 {
                    // Nothing points at an input: halve the batch, so that no instance is given
                    // an error (which may quote an input) that belongs to another.
                    split(inner, module, inputs, &mut pending, &mut results).await;
                } else if per_input.is_empty() {
                    let error = RenderError::Evaluation {
                        message: batch::clean_message(&message),
                    };
                    fail_all(&mut pending, &mut results, &error);
                } else {
                    let failed: Vec<usize> = per_input.keys().map(|k| pending[*k]).collect();
                    for (k, messages) in per_input {
                        results[pending[k]] = Some(Err(RenderError::Evaluation {
                            message: messages.join("\n"),
                        }));
                    }
                    pending.retain(|i| !failed.contains(i));
                }
            }
            // Halve the batch until each part's output fits, and until a slow or hungry input is
            // alone: one instance never fails, times out or starves the others of its batch.
            Err(CueError::OutputTooLarge { .. } | CueError::Timeout { .. } | CueError::MemoryLimit { .. })
                if pending.len() > 1 =>
            {
                split(inner, module, inputs, &mut pending, &mut results).await;
            }
            Err(other) => fail_all(&mut pending, &mut results, &RenderError::from(other)),
        }
    }
    results
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|| {
                Err(RenderError::InvalidOutput {
                    message: "no result".into(),
                })
            })
        })
        .collect()
}

/// One cue call for `batch`, timed and logged.
async fn timed_cue_batch(
    inner: &Inner,
    module: &Module,
    batch: &[&Value],
) -> Result<Result<Vec<Result<RenderOutput, RenderError>>, RenderError>, CueError> {
    let started = Instant::now();
    let outcome = run_cue_batch(inner, module, batch).await;
    let took = started.elapsed();
    inner
        .metrics
        .cue_render_duration_seconds
        .with_label_values(&[&module.platform])
        .observe(took.as_secs_f64());
    tracing::debug!(
        platform = %module.platform,
        instances = batch.len(),
        duration_ms = took.as_millis() as u64,
        ok = matches!(outcome, Ok(Ok(_))),
        "render finished"
    );
    outcome
}

/// Every input still pending gets `error`.
fn fail_all(pending: &mut Vec<usize>, results: &mut [Option<Result<RenderOutput, RenderError>>], error: &RenderError) {
    for i in pending.drain(..) {
        results[i] = Some(Err(error.clone()));
    }
}

/// Renders the two halves of `pending` on their own and records their results.
async fn split(
    inner: &Inner,
    module: &Module,
    inputs: &[&Value],
    pending: &mut Vec<usize>,
    results: &mut [Option<Result<RenderOutput, RenderError>>],
) {
    let second = pending.split_off(pending.len() / 2);
    let first_inputs: Vec<&Value> = pending.iter().map(|i| inputs[*i]).collect();
    let second_inputs: Vec<&Value> = second.iter().map(|i| inputs[*i]).collect();
    let first_results = Box::pin(render_batch(inner, module, &first_inputs)).await;
    let second_results = Box::pin(render_batch(inner, module, &second_inputs)).await;
    for (i, r) in pending
        .iter()
        .zip(first_results)
        .chain(second.iter().zip(second_results))
    {
        results[*i] = Some(r);
    }
    pending.clear();
}

/// One cue call: writes the batch file, exports it, parses the results. The outer error is
/// cue's; the inner one is a problem with cue's output as a whole.
async fn run_cue_batch(
    inner: &Inner,
    module: &Module,
    inputs: &[&Value],
) -> Result<Result<Vec<Result<RenderOutput, RenderError>>, RenderError>, CueError> {
    let dir = match inner.store.scratch_dir(module) {
        Ok(dir) => dir,
        Err(e) => return Ok(Err(e.into())),
    };
    let source = batch::batch_source(module, inputs);
    if let Err(e) = tokio::fs::write(dir.join(batch::BATCH_FILE), source).await {
        return Ok(Err(RenderError::InvalidModule {
            message: format!("writing batch file: {e}"),
        }));
    }
    let relative = format!("./{}", dir.file_name().map(|n| n.to_string_lossy()).unwrap_or_default());
    let outcome = inner
        .cli
        .run(&["export", &relative, "--out", "json"], Some(&module.dir))
        .await;
    let _ = tokio::fs::remove_dir_all(&dir).await;
    Ok(batch::parse_batch(&outcome?, inputs.len()))
}

/// Least-recently-used cache of render results, bounded by entries and by bytes (the most
/// recent result always stays). A result is held as its JSON text, which is what the bytes
/// count: as `serde_json` trees its node objects took several times that, for every instance
/// of a fleet (a rollout's plan renders them all, and their moves read the results again).
/// Its gauges move by differences because the module cache reports into the same ones.
struct RenderCache {
    capacity: usize,
    max_bytes: u64,
    lru: Lru<Held>,
}

/// A render result as the cache holds it: the output's JSON text, or the failure.
type Held = Result<String, RenderError>;

/// `result` as the cache holds it; made before taking the cache's lock.
fn held(result: &RenderResult) -> Option<Held> {
    match result {
        Ok(output) => serde_json::to_string(&**output).ok().map(Ok),
        Err(e) => Some(Err(e.clone())),
    }
}

/// A held result read back; after the cache's lock is released.
fn read_held(held: Held) -> Option<RenderResult> {
    match held {
        Ok(text) => serde_json::from_str(&text).ok().map(|output| Ok(Arc::new(output))),
        Err(e) => Some(Err(e)),
    }
}

impl RenderCache {
    fn new(capacity: usize, max_bytes: u64) -> Self {
        Self {
            capacity: capacity.max(1),
            max_bytes,
            lru: Lru::default(),
        }
    }

    fn get(&mut self, key: &str) -> Option<Held> {
        self.lru.get(key).cloned()
    }

    fn remove(&mut self, key: &str, metrics: &Metrics) {
        let (entries, bytes) = (self.lru.len() as i64, self.lru.bytes() as i64);
        self.lru.remove(key);
        metrics.cue_cache_entries.add(self.lru.len() as i64 - entries);
        metrics.cue_cache_size_bytes.add(self.lru.bytes() as i64 - bytes);
    }

    fn insert(&mut self, key: String, held: Held, metrics: &Metrics) {
        let size = held.as_ref().map_or(256, String::len);
        let (entries, bytes) = (self.lru.len() as i64, self.lru.bytes() as i64);
        self.lru.insert(key, held, size as u64);
        while (self.lru.len() > self.capacity || (self.lru.bytes() > self.max_bytes && self.lru.len() > 1))
            && self.lru.pop_oldest().is_some()
        {
            metrics.cue_cache_evictions_total.inc();
        }
        metrics.cue_cache_entries.add(self.lru.len() as i64 - entries);
        metrics.cue_cache_size_bytes.add(self.lru.bytes() as i64 - bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Node;

    fn job(n: usize) -> Job {
        Job {
            key: n.to_string(),
            input: Value::from(n),
            reply: oneshot::channel().0,
        }
    }

    #[tokio::test]
    async fn a_batch_gathers_renders_while_they_keep_arriving_and_a_lone_one_waits_one_window() {
        let config = RendererConfig::new("/tmp");
        let (send, mut jobs) = mpsc::unbounded_channel();
        // A burst: 60 renders, one every 5 ms (a window is 25 ms).
        let producer = tokio::spawn(async move {
            for n in 1..60 {
                tokio::time::sleep(Duration::from_millis(5)).await;
                let _ = send.send(job(n));
            }
        });
        let started = std::time::Instant::now();
        let batch = gather(job(0), &mut jobs, &config).await;
        producer.await.unwrap();
        assert!(batch.len() >= 50, "one batch for the burst, got {}", batch.len());
        assert!(started.elapsed() < config.max_batch_wait + Duration::from_millis(200));

        let (_send, mut jobs) = mpsc::unbounded_channel();
        let started = std::time::Instant::now();
        assert_eq!(gather(job(0), &mut jobs, &config).await.len(), 1);
        assert!(
            started.elapsed() < Duration::from_millis(200),
            "a lone render is not held"
        );
    }

    fn output(id: &str) -> RenderResult {
        Ok(Arc::new(RenderOutput {
            metadata: None,
            nodes: Vec::new(),
            violations: vec![crate::api::Violation {
                path: id.into(),
                message: String::new(),
                severity: crate::api::Severity::Info,
            }],
            status: Default::default(),
        }))
    }

    fn get(cache: &mut RenderCache, key: &str) -> Option<RenderResult> {
        cache.get(key).and_then(read_held)
    }

    fn text_len(result: &RenderResult) -> i64 {
        serde_json::to_string(&**result.as_ref().unwrap()).unwrap().len() as i64
    }

    #[test]
    fn cache_evicts_the_least_recently_used_and_reports_its_text() {
        let metrics = Metrics::new().unwrap();
        let mut cache = RenderCache::new(2, u64::MAX);
        cache.insert("a".into(), held(&output("a")).unwrap(), &metrics);
        cache.insert("b".into(), held(&output("b")).unwrap(), &metrics);
        assert!(get(&mut cache, "a").is_some()); // a is now newer than b
        cache.insert("c".into(), held(&output("c")).unwrap(), &metrics);
        assert!(get(&mut cache, "b").is_none());
        assert_eq!(
            get(&mut cache, "a").unwrap().unwrap(),
            output("a").unwrap(),
            "read back as rendered"
        );
        assert!(get(&mut cache, "c").is_some());
        assert_eq!(metrics.cue_cache_evictions_total.get(), 1);
        assert_eq!(metrics.cue_cache_entries.get(), 2);
        assert_eq!(
            metrics.cue_cache_size_bytes.get(),
            text_len(&output("a")) + text_len(&output("c"))
        );
        cache.insert("c".into(), held(&output("c-longer")).unwrap(), &metrics);
        assert_eq!(
            metrics.cue_cache_size_bytes.get(),
            text_len(&output("a")) + text_len(&output("c-longer"))
        );
    }

    #[test]
    fn cached_failures_are_answered_as_they_were() {
        let metrics = Metrics::new().unwrap();
        let mut cache = RenderCache::new(2, u64::MAX);
        let failure = RenderError::InvalidModule {
            message: "no #Render".into(),
        };
        cache.insert("bad".into(), held(&Err(failure.clone())).unwrap(), &metrics);
        assert_eq!(get(&mut cache, "bad").unwrap().unwrap_err(), failure);
    }

    #[test]
    fn a_node_object_is_read_back_from_the_cached_text() {
        let metrics = Metrics::new().unwrap();
        let mut cache = RenderCache::new(2, u64::MAX);
        let node: Node = serde_json::from_value(serde_json::json!({
            "id": "cm", "object": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"a": "1"}},
            "dependsOn": ["other"], "readyWhen": [{"type": "Exists"}]
        }))
        .unwrap();
        let rendered = Arc::new(RenderOutput {
            metadata: None,
            nodes: vec![node],
            violations: Vec::new(),
            status: [("url".to_string(), serde_json::json!("${svc.spec.clusterIP}"))].into(),
        });
        cache.insert("k".into(), held(&Ok(rendered.clone())).unwrap(), &metrics);
        assert_eq!(get(&mut cache, "k").unwrap().unwrap(), rendered);
    }

    #[test]
    fn cache_stays_within_its_bytes_and_keeps_the_newest() {
        let metrics = Metrics::new().unwrap();
        let each = text_len(&output("a")) as u64;
        let mut cache = RenderCache::new(100, each * 5 / 2);
        for key in ["a", "b", "c"] {
            cache.insert(key.into(), held(&output(key)).unwrap(), &metrics);
        }
        assert!(
            get(&mut cache, "a").is_none(),
            "the oldest goes once three exceed two and a half"
        );
        assert!(get(&mut cache, "b").is_some() && get(&mut cache, "c").is_some());
        let huge = "h".repeat(500);
        cache.insert(huge.clone(), held(&output(&huge)).unwrap(), &metrics);
        assert!(
            get(&mut cache, &huge).is_some(),
            "the newest stays even alone over the budget"
        );
        assert_eq!(metrics.cue_cache_entries.get(), 1);
    }
}
