//! Versioned modules (`#Versions`) against the real cue CLI: extraction of the versions,
//! the contract's refusals, conversion in batches, and round-trip checks.

use pequod::cue::{ApiVersion, Conversion, ConversionError, Module};
use pequod::error::ErrorCategory;
use serde_json::{Value, json};

use super::{Harness, harness, module};

/// The example of the design: v1alpha1 names the port `port`, a string; the storage version
/// v1beta1 names it `listenPort`, an int, and has a `debug` flag v1alpha1 cannot carry. v1
/// is the storage schema under another name.
fn web_module(lossy: &str) -> String {
    format!(
        r#"package web

import "strconv"

#Input: {{
	image:      string
	listenPort: int & >0 & <65536
	debug?:     bool
}}

#Versions: {{
	v1alpha1: {{
		deprecated:         true
		deprecationWarning: "v1alpha1 is deprecated; use v1beta1"
		{lossy}
		#Input: {{image: string, port: string}}
		#ToStorage: {{in: #Input, out: {{image: in.image, listenPort: strconv.Atoi(in.port)}}}}
		#FromStorage: {{in: _, out: {{image: in.image, port: strconv.FormatInt(in.listenPort, 10)}}}}
	}}
	v1beta1: {{storage: true}}
	v1: {{
		served: false
		#Input: {{image: string, listenPort: int & >0 & <65536, debug?: bool}}
		#ToStorage: {{in: #Input, out: in}}
		#FromStorage: {{in: _, out: in}}
	}}
}}

#Render: {{
	input: _
	output: nodes: [{{id: "cm", object: {{apiVersion: "v1", kind: "ConfigMap", metadata: name: input.metadata.name, data: image: input.spec.image}}}}]
}}
"#
    )
}

async fn load(h: &Harness, source: &str) -> Module {
    h.renderer.load(module(source), "web").await.unwrap()
}

fn conversion(from: &str, to: &str, spec: Value) -> Conversion {
    Conversion {
        from: from.into(),
        to: to.into(),
        spec,
    }
}

fn conversions_timed(h: &Harness) -> u64 {
    h.metrics
        .conversion_duration_seconds
        .with_label_values(&["web"])
        .get_sample_count()
}

#[tokio::test]
async fn a_versioned_module_s_schemas_flags_and_order() {
    let h = harness();
    let m = load(&h, &web_module(r#"lossy: ["debug"]"#)).await;
    assert!(m.has_versions);
    let schema = h.renderer.schema(&m).await.unwrap();
    let names: Vec<&str> = schema.versions.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["v1", "v1beta1", "v1alpha1"], "Kubernetes' priority order");
    let [v1, v1beta1, v1alpha1] = &schema.versions[..] else {
        panic!("three versions")
    };
    assert_eq!(
        v1beta1,
        &ApiVersion {
            name: "v1beta1".into(),
            served: true,
            storage: true,
            deprecated: false,
            deprecation_warning: None,
            lossy: Vec::new(),
            spec: schema.spec.clone(),
        }
    );
    assert_eq!(schema.spec["properties"]["listenPort"]["type"], "integer");
    assert_eq!(
        v1alpha1.spec,
        json!({"type": "object", "required": ["image", "port"], "properties": {"image": {"type": "string"}, "port": {"type": "string"}}})
    );
    assert!(v1alpha1.served && !v1alpha1.storage && v1alpha1.deprecated);
    assert_eq!(
        v1alpha1.deprecation_warning.as_deref(),
        Some("v1alpha1 is deprecated; use v1beta1")
    );
    assert_eq!(v1alpha1.lossy, ["debug"]);
    assert!(!v1.served);
    assert_eq!(
        v1.spec["properties"]["listenPort"],
        schema.spec["properties"]["listenPort"]
    );

    // A folder written before versions existed lacks the generated packages: a module found
    // there by digest still knows it has versions, and its extraction writes them again.
    std::fs::remove_file(m.dir.join("meta/versions.cue")).unwrap();
    std::fs::remove_dir_all(m.dir.join("versions")).unwrap();
    let found = h.renderer.find(&m.digest, "web").await.unwrap();
    assert_eq!(found, m);
    let other = super::harness_with(std::time::Duration::from_secs(60), super::cue_binary());
    let again = other.renderer.schema(&found).await;
    assert_eq!(again.unwrap().versions, schema.versions);
}

#[tokio::test]
async fn modules_without_versions_have_none() {
    let h = harness();
    let m = super::webservice(&h).await;
    assert!(!m.has_versions);
    assert!(h.renderer.schema(&m).await.unwrap().versions.is_empty());
    let same = h
        .renderer
        .convert(&m, &[conversion("v1alpha1", "v1alpha1", json!({"image": "x"}))])
        .await;
    assert_eq!(same, [Ok(json!({"image": "x"}))]);
    let other = h
        .renderer
        .convert(&m, &[conversion("v1alpha1", "v1", json!({"image": "x"}))])
        .await;
    assert!(matches!(&other[0], Err(ConversionError::Module { message }) if message.contains("declares no #Versions")));
}

#[tokio::test]
async fn a_single_version_is_the_storage_version_with_the_module_s_input() {
    let h = harness();
    let m = load(&h, &versions_module("v1: {storage: true, deprecated: true}")).await;
    let schema = h.renderer.schema(&m).await.unwrap();
    assert_eq!(schema.versions.len(), 1);
    assert_eq!(schema.versions[0].name, "v1");
    assert!(schema.versions[0].storage && schema.versions[0].served && schema.versions[0].deprecated);
    assert_eq!(schema.versions[0].spec, schema.spec);
}

/// A module whose `#Versions` is `versions`, beside a plain #Input.
fn versions_module(versions: &str) -> String {
    format!(
        "package v\n\n#Input: {{a: string}}\n\n#Versions: {{\n{versions}\n}}\n\n#Render: {{input: _, output: nodes: []}}\n"
    )
}

const CONVERTS: &str = "#Input: {a: string}, #ToStorage: {in: _, out: in}, #FromStorage: {in: _, out: in}";

#[tokio::test]
async fn every_rule_of_the_contract_is_refused_with_the_version_named() {
    let h = harness();
    let nine: String = (2..=10).map(|i| format!("v{i}: {{{CONVERTS}}}\n")).collect();
    let cases = [
        (
            format!("v1: {{storage: true}}\n\"v1.0\": {{{CONVERTS}}}"),
            "#Versions.v1.0: a version name must match",
        ),
        (
            format!("v1: {{storage: true}}\nversion2: {{{CONVERTS}}}"),
            "#Versions.version2: a version name must match",
        ),
        (
            format!("v1: {{storage: true}}\n{nine}"),
            "#Versions declares 10 versions; at most 8",
        ),
        ("".to_string(), "#Versions declares no version"),
        (
            format!("v1: {{{CONVERTS}}}\nv2: {{{CONVERTS}}}"),
            "no version is the storage version",
        ),
        (
            "v1: {storage: true}\nv2: {storage: true}".to_string(),
            "v2, v1 are each marked storage: true",
        ),
        (
            "v1: {storage: true, served: false}".to_string(),
            "#Versions.v1: the storage version must be served",
        ),
        (
            "v1: {storage: true, #Input: {a: string}}".to_string(),
            "#Versions.v1: the storage version's schema is the module's #Input and needs no conversion; remove its #Input",
        ),
        (
            "v1: {storage: true}\nv1beta1: {#Input: {a: string}, #FromStorage: {in: _, out: in}}".to_string(),
            "#Versions.v1beta1: defines no #ToStorage; every version but the storage version needs #Input, #ToStorage and #FromStorage",
        ),
        (
            "v1: {storage: true}\nv1beta1: {}".to_string(),
            "#Versions.v1beta1: defines no #Input, #ToStorage, #FromStorage",
        ),
        (
            format!("v1: {{storage: true}}\nv1beta1: {{stored: true, {CONVERTS}}}"),
            "#Versions.v1beta1: unknown field `stored`",
        ),
        (
            format!("v1: {{storage: true}}\nv1beta1: {{served: bool, {CONVERTS}}}"),
            "#Versions.v1beta1.served: incomplete value bool",
        ),
        (
            format!("v1: {{storage: true}}\nv1beta1: {{lossy: [\"spec.a\"], {CONVERTS}}}"),
            "#Versions.v1beta1: lossy path \"spec.a\" names no field",
        ),
        (
            format!(
                "v1: {{storage: true}}\nv1beta1: {{lossy: [{}], {CONVERTS}}}",
                vec!["\"a\""; 65].join(", ")
            ),
            "#Versions.v1beta1: lossy lists 65 paths; at most 64 are allowed",
        ),
    ];
    for (versions, want) in cases {
        let m = load(&h, &versions_module(&versions)).await;
        let err = h.renderer.schema(&m).await.unwrap_err();
        assert!(
            err.to_string().contains(want),
            "#Versions {{{versions}}}:\n{err}\nshould contain {want:?}"
        );
        assert!(matches!(err, pequod::cue::RenderError::InvalidModule { .. }), "{err:?}");
    }
}

#[tokio::test]
async fn specs_convert_both_ways_with_a_renamed_field_of_another_type() {
    let h = harness();
    let m = load(&h, &web_module("")).await;
    let results = h
        .renderer
        .convert(
            &m,
            &[
                conversion("v1alpha1", "v1beta1", json!({"image": "nginx", "port": "8080"})),
                conversion(
                    "v1beta1",
                    "v1alpha1",
                    json!({"image": "nginx", "listenPort": 9090, "debug": true}),
                ),
                conversion("v1alpha1", "v1", json!({"image": "nginx", "port": "7070"})),
                conversion("v1beta1", "v1beta1", json!({"anything": "as it is"})),
            ],
        )
        .await;
    assert_eq!(
        results,
        [
            Ok(json!({"image": "nginx", "listenPort": 8080})),
            Ok(json!({"image": "nginx", "port": "9090"})),
            Ok(json!({"image": "nginx", "listenPort": 7070})),
            Ok(json!({"anything": "as it is"})),
        ]
    );
    assert_eq!(conversions_timed(&h), 1, "one cue call for all of them");
}

#[tokio::test]
async fn an_integral_float_converts_like_the_int_it_is_cached_as() {
    // 8080.0 and 8080 share a cache key (the spec's canonical text), so cue must read the same
    // text for both: given as serde prints it, cue would refuse 8080.0 for an int field and
    // that failure would answer for 8080 too.
    let h = harness();
    let m = load(&h, &web_module("")).await;
    let float = conversion("v1beta1", "v1alpha1", json!({"image": "nginx", "listenPort": 8080.0}));
    let int = conversion("v1beta1", "v1alpha1", json!({"image": "nginx", "listenPort": 8080}));
    let want = Ok(json!({"image": "nginx", "port": "8080"}));
    let first = h.renderer.convert(&m, std::slice::from_ref(&float)).await;
    assert_eq!(first[0], want);
    assert_eq!(h.renderer.convert(&m, &[int]).await[0], want);
    assert_eq!(conversions_timed(&h), 1, "the int is the float's cached result");
    let back = conversion("v1alpha1", "v1beta1", json!({"image": "nginx", "port": "8080"}));
    let round = h.renderer.convert(&m, &[float, back]).await;
    assert_eq!(round[0], want);
    assert_eq!(round[1], Ok(json!({"image": "nginx", "listenPort": 8080})));
}

#[tokio::test]
async fn a_failing_object_gets_an_error_naming_its_field_and_the_others_convert() {
    let h = harness();
    let m = load(&h, &web_module("")).await;
    let results = h
        .renderer
        .convert(
            &m,
            &[
                conversion("v1alpha1", "v1beta1", json!({"image": "a", "port": "80"})),
                conversion("v1alpha1", "v1beta1", json!({"image": "b", "port": 80})),
                conversion("v1alpha1", "v1beta1", json!({"image": "c", "port": "70000"})),
                conversion("v1alpha1", "v1beta1", json!({"image": "d"})),
                conversion(
                    "v1alpha1",
                    "v1beta1",
                    json!({"image": "e", "port": "81", "colour": "red"}),
                ),
                conversion("v1alpha1", "v9", json!({"image": "f", "port": "81"})),
                conversion("v1alpha1", "v1beta1", json!({"image": "g", "port": "82"})),
            ],
        )
        .await;
    assert_eq!(results[0], Ok(json!({"image": "a", "listenPort": 80})));
    assert_eq!(results[6], Ok(json!({"image": "g", "listenPort": 82})));
    let field = |i: usize| match &results[i] {
        Err(ConversionError::Field { path, message }) => (path.clone(), message.clone()),
        other => panic!("object {i}: {other:?}"),
    };
    let (path, message) = field(1);
    assert_eq!(path, "spec.port");
    assert!(message.contains("conflicting values 80 and string"), "{message}");
    let (path, message) = field(2);
    assert_eq!(path, "spec.listenPort");
    assert!(
        message.contains("out of bound <65536") && message.contains("after converting v1alpha1 to v1beta1"),
        "{message}"
    );
    let (path, message) = field(3);
    assert_eq!(path, "spec.port");
    assert!(message.contains("incomplete value string"), "{message}");
    let (path, message) = field(4);
    assert_eq!(path, "spec.colour");
    assert!(message.contains("field not allowed"), "{message}");
    assert!(matches!(&results[5], Err(ConversionError::Module { message }) if message.contains("no version v9")));
    for r in &results[1..5] {
        let e = r.as_ref().unwrap_err();
        assert_eq!(e.reason(), "ConversionFailed");
        assert!(!e.to_string().contains("\"image\""), "no input echoed: {e}");
    }
}

#[tokio::test]
async fn a_hundred_objects_take_one_cue_call_and_none_once_cached() {
    // Within the default max_conversion_batch, which splits larger sets (below): 500 objects
    // take one call.
    assert!(pequod::cue::RendererConfig::new("/tmp").max_conversion_batch >= 500);
    let h = harness();
    let m = load(&h, &web_module("")).await;
    h.renderer.schema(&m).await.unwrap();
    let items: Vec<Conversion> = (0..100)
        .map(|i| {
            conversion(
                "v1alpha1",
                "v1beta1",
                json!({"image": format!("app-{i}"), "port": format!("{}", 1000 + i)}),
            )
        })
        .collect();
    let exports = h.invocations("export");
    let results = h.renderer.convert(&m, &items).await;
    assert_eq!(h.invocations("export") - exports, 1);
    assert_eq!(conversions_timed(&h), 1);
    for (i, r) in results.iter().enumerate() {
        assert_eq!(
            r.as_ref().unwrap(),
            &json!({"image": format!("app-{i}"), "listenPort": 1000 + i})
        );
    }
    let again = h.renderer.convert(&m, &items).await;
    assert_eq!(again, results);
    assert_eq!(h.invocations("export") - exports, 1, "cached: no cue call");
    // Errors are cached too.
    let bad = [conversion("v1alpha1", "v1beta1", json!({"image": "x", "port": "x"}))];
    let first = h.renderer.convert(&m, &bad).await;
    assert!(first[0].is_err());
    assert_eq!(h.renderer.convert(&m, &bad).await, first);
    assert_eq!(h.invocations("export") - exports, 2);
}

#[tokio::test]
async fn conversions_of_more_than_max_conversion_batch_objects_take_several_cue_calls() {
    let cache = tempfile::tempdir().unwrap();
    let metrics = std::sync::Arc::new(pequod::metrics::Metrics::new().unwrap());
    let cli = pequod::cue::CueCli::new(super::cue_binary(), std::time::Duration::from_secs(60), 2)
        .with_metrics(metrics.clone());
    let mut config = pequod::cue::RendererConfig::new(cache.path());
    config.max_conversion_batch = 2;
    let h = Harness {
        renderer: pequod::cue::Renderer::new(cli, config, metrics.clone()),
        metrics,
        _cache: cache,
    };
    let m = load(&h, &web_module("")).await;
    let versions = h.renderer.schema(&m).await.unwrap().versions.clone();
    let exports = h.invocations("export");
    let items: Vec<Conversion> = (0..5)
        .map(|i| {
            conversion(
                "v1beta1",
                "v1alpha1",
                json!({"image": format!("app-{i}"), "listenPort": 80 + i}),
            )
        })
        .collect();
    let results = h.renderer.convert(&m, &items).await;
    for (i, r) in results.iter().enumerate() {
        assert_eq!(
            r,
            &Ok(json!({"image": format!("app-{i}"), "port": format!("{}", 80 + i)}))
        );
    }
    assert_eq!(h.invocations("export") - exports, 3, "2 + 2 + 1 objects");
    assert_eq!(conversions_timed(&h), 3);

    // Round trips of three specs stored in the storage version: three trips through
    // v1alpha1 (the only other served version), in two calls; none failing.
    let specs: Vec<Value> = (0..3)
        .map(|i| json!({"image": format!("trip-{i}"), "listenPort": 90 + i}))
        .collect();
    let exports = h.invocations("export");
    let failures = h.renderer.round_trips(&m, &versions, "v1beta1", &specs).await;
    assert_eq!(failures, vec![Vec::<String>::new(); 3]);
    assert_eq!(h.invocations("export") - exports, 2);
}

#[tokio::test]
async fn round_trips_find_lost_fields_unless_declared_lossy() {
    let h = harness();
    let stored_in_storage = [
        json!({"image": "a", "listenPort": 80}),
        json!({"image": "b", "listenPort": 81, "debug": true}),
    ];
    let stored_in_v1alpha1 = [
        json!({"image": "c", "port": "82"}),
        json!({"image": "d", "port": "083"}),
        json!({"image": "e", "port": "x"}),
    ];

    let strict = load(&h, &web_module("")).await;
    let versions = h.renderer.schema(&strict).await.unwrap().versions.clone();
    let exports = h.invocations("export");
    let failures = h
        .renderer
        .round_trips(&strict, &versions, "v1beta1", &stored_in_storage)
        .await;
    assert_eq!(
        failures,
        [
            Vec::<String>::new(),
            vec!["through v1alpha1: spec.debug differs".to_string()]
        ]
    );
    assert_eq!(
        h.invocations("export") - exports,
        1,
        "stored in the storage version: one cue call, for the second steps"
    );
    let exports = h.invocations("export");
    let failures = h
        .renderer
        .round_trips(&strict, &versions, "v1alpha1", &stored_in_v1alpha1)
        .await;
    assert_eq!(failures[0], Vec::<String>::new());
    assert_eq!(failures[1], ["back to v1alpha1: spec.port differs"]);
    assert_eq!(failures[2].len(), 1, "{:?}", failures[2]);
    // The step and the field only: not cue's text, which quotes the value (`parsing "x"`).
    assert_eq!(failures[2], ["to v1beta1: spec.listenPort: conversion failed"]);
    // Two calls, and one more for the first steps that did not fail (cue prints no result
    // beside an error).
    assert_eq!(h.invocations("export") - exports, 3);

    let lossy = load(&h, &web_module(r#"lossy: ["debug"]"#)).await;
    let versions = h.renderer.schema(&lossy).await.unwrap().versions.clone();
    let failures = h
        .renderer
        .round_trips(&lossy, &versions, "v1beta1", &stored_in_storage)
        .await;
    assert_eq!(failures, [Vec::<String>::new(), Vec::new()]);
}
