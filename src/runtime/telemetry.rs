//! Logging set-up: JSON lines by default, a human-readable console format on request.
//!
//! JSON lines are flat: the fields of the spans a line was logged in (a reconcile's
//! `controller`, `namespace`, `name` and `reconcile_id`) sit beside the event's own, so that log
//! queries need no nesting. (tracing-subscriber's JSON format nests them under `span`, where a
//! `name` field collides with the span's own name.)

use std::io::Write;
use std::sync::{Arc, Mutex};

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Record};
use tracing::{Event, Id, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{EnvFilter, Layer, fmt, prelude::*};

use clap::ValueEnum;

/// `--zap-log-level`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogLevel {
    Debug,
    Info,
    Warn,
    Error,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Debug => "debug",
            Self::Info => "info",
            Self::Warn => "warn",
            Self::Error => "error",
        }
    }
}

/// `--zap-encoder`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogEncoder {
    Json,
    Console,
}

/// Installs the global tracing subscriber. `RUST_LOG`, when set, overrides the level for
/// finer per-module filtering.
pub fn init(level: LogLevel, encoder: LogEncoder) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        // Dependencies stay at warn so that info means "what Pequod did".
        EnvFilter::new(format!("warn,pequod={}", level.as_str()))
    });
    let registry = tracing_subscriber::registry().with(filter);
    match encoder {
        LogEncoder::Json => registry
            .with(JsonLayer::new(Arc::new(Mutex::new(std::io::stdout()))))
            .init(),
        LogEncoder::Console => registry.with(fmt::layer().with_target(false)).init(),
    }
}

type Output = Arc<Mutex<dyn Write + Send>>;

/// Writes one flat JSON object per event.
pub struct JsonLayer {
    out: Output,
}

impl JsonLayer {
    pub fn new(out: Output) -> Self {
        Self { out }
    }
}

/// The fields of a span, kept in its extensions.
struct SpanFields(Map<String, Value>);

struct Collect<'a>(&'a mut Map<String, Value>);

impl Visit for Collect<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0.insert(field.name().into(), Value::from(value.to_string()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().into(), Value::from(format!("{value:?}")));
    }
}

impl<S> Layer<S> for JsonLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = Map::new();
        attrs.record(&mut Collect(&mut fields));
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(SpanFields(fields));
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id)
            && let Some(fields) = span.extensions_mut().get_mut::<SpanFields>()
        {
            values.record(&mut Collect(&mut fields.0));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let metadata = event.metadata();
        let mut line = Map::new();
        line.insert("timestamp".into(), Value::from(jiff::Timestamp::now().to_string()));
        line.insert("level".into(), Value::from(metadata.level().as_str()));
        // Outer spans first, so that inner ones and the event itself win on a clash.
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(fields) = span.extensions().get::<SpanFields>() {
                    line.extend(fields.0.clone());
                }
            }
        }
        event.record(&mut Collect(&mut line));
        line.insert("target".into(), Value::from(metadata.target()));
        let mut bytes = serde_json::to_vec(&Value::Object(line)).unwrap_or_default();
        bytes.push(b'\n');
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let _ = out.write_all(&bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_are_flat_json_with_the_reconcile_fields() {
        let buffer = Buffer::default();
        let subscriber = tracing_subscriber::registry().with(JsonLayer::new(Arc::new(Mutex::new(buffer.clone()))));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(
                "reconcile",
                controller = "transform",
                namespace = "team",
                name = "webservice",
                reconcile_id = "1-2"
            );
            let _entered = span.enter();
            tracing::warn!(kind = "WebService", attempt = 3, "serving kind");
        });
        tracing::subscriber::with_default(
            tracing_subscriber::registry().with(JsonLayer::new(Arc::new(Mutex::new(buffer.clone())))),
            || tracing::info!("outside any reconcile"),
        );
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2);
        let first = &lines[0];
        for (key, want) in [
            ("controller", "transform"),
            ("namespace", "team"),
            ("name", "webservice"),
            ("reconcile_id", "1-2"),
            ("message", "serving kind"),
            ("kind", "WebService"),
            ("level", "WARN"),
        ] {
            assert_eq!(first[key], want, "{key} in {first}");
        }
        assert_eq!(first["attempt"], 3);
        assert!(first["timestamp"].as_str().unwrap().ends_with('Z'));
        assert!(lines[1].get("controller").is_none());
    }
}
