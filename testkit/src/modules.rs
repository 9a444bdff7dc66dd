//! CUE modules for tests: small modules as text, and ConfigMaps that hold them.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;

use crate::TEST_MANAGER;

/// Server-side applies ConfigMap `name`, a module of the one file `note.cue` holding `source`.
pub async fn put_module(client: &Client, namespace: &str, name: &str, source: &str) {
    put_module_files(
        client,
        namespace,
        name,
        BTreeMap::from([("note.cue".to_string(), source.to_string())]),
    )
    .await;
}

/// Server-side applies ConfigMap `name`, a module of `files` (file name to source).
pub async fn put_module_files(client: &Client, namespace: &str, name: &str, files: BTreeMap<String, String>) {
    let cm = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "labels": {"pequod.io/cue-module": "true"}},
        "data": files,
    });
    Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .patch(name, &PatchParams::apply(TEST_MANAGER).force(), &Patch::Apply(cm))
        .await
        .unwrap_or_else(|e| panic!("apply module ConfigMap {name}: {e}"));
}

/// A platform module: a Note is a ConfigMap, then a ServiceAccount that waits for it.
pub const NOTE_MODULE: &str = r#"package note

#Metadata: kind: "Note"

#Input: {
	text: string
}

#Render: {
	input: {metadata: {name: string, namespace: string, ...}, spec: #Input}
	output: nodes: [{
		id: "config"
		object: {apiVersion: "v1", kind: "ConfigMap", metadata: name: input.metadata.name, data: text: input.spec.text}
		readyWhen: [{type: "Exists"}]
	}, {
		id: "account"
		dependsOn: ["config"]
		object: {apiVersion: "v1", kind: "ServiceAccount", metadata: name: input.metadata.name}
		readyWhen: [{type: "Exists"}]
	}]
}
"#;

/// A Chain is three ConfigMaps `<name>-a`, `-b`, `-c`, each waiting for the one before
/// (`Exists` gates), holding `spec.value`: the scale benchmark's module.
pub const CHAIN_MODULE: &str = r#"package chain

#Metadata: kind: "Chain"

#Input: {
	value: string
}

#Render: {
	input: {metadata: {name: string, namespace: string, ...}, spec: #Input}
	output: nodes: [{
		id: "a"
		object: {apiVersion: "v1", kind: "ConfigMap", metadata: name: "\(input.metadata.name)-a", data: value: input.spec.value}
		readyWhen: [{type: "Exists"}]
	}, {
		id: "b"
		dependsOn: ["a"]
		object: {apiVersion: "v1", kind: "ConfigMap", metadata: name: "\(input.metadata.name)-b", data: value: input.spec.value}
		readyWhen: [{type: "Exists"}]
	}, {
		id: "c"
		dependsOn: ["b"]
		object: {apiVersion: "v1", kind: "ConfigMap", metadata: name: "\(input.metadata.name)-c", data: value: input.spec.value}
		readyWhen: [{type: "Exists"}]
	}]
}
"#;

/// A small module: a Note is a ConfigMap holding a text. `fields` is added to `#Input`.
pub fn note_module(fields: &str) -> String {
    format!(
        r#"package note

#Metadata: {{
	kind: "Note"
	description: "A note kept in a ConfigMap."
}}

#Input: {{
	// The note's text.
	text: string
	{fields}
}}

#Render: {{
	input: {{metadata: {{name: string, namespace: string, ...}}, spec: #Input}}
	output: nodes: [{{
		id: "note"
		object: {{apiVersion: "v1", kind: "ConfigMap", metadata: name: input.metadata.name, data: text: input.spec.text}}
		readyWhen: [{{type: "Exists"}}]
	}}]
}}
"#
    )
}

/// A module of kind `kind` keeping one ConfigMap `<kind>-<name>` with `data.version`.
pub fn labelled_module(kind: &str, version: &str) -> String {
    let lower = kind.to_ascii_lowercase();
    format!(
        r#"package {lower}

#Metadata: kind: "{kind}"

#Input: {{
	text: string
}}

#Render: {{
	input: {{metadata: {{name: string, namespace: string, ...}}, spec: #Input}}
	output: nodes: [{{
		id: "config"
		object: {{apiVersion: "v1", kind: "ConfigMap", metadata: name: "{lower}-\(input.metadata.name)", data: {{text: input.spec.text, version: "{version}"}}}}
	}}]
}}
"#
    )
}

/// `Web` v1alpha1: a port as a string. Rendered into ConfigMap `web-<name>`.
pub const V1ALPHA1_WEB: &str = r#"package web

#Metadata: kind: "Web"

#Input: {
	image: string
	port:  string
	debug?: bool
}

#Render: {
	input: {metadata: {name: string, namespace: string, ...}, spec: #Input}
	output: nodes: [{
		id: "config"
		object: {apiVersion: "v1", kind: "ConfigMap", metadata: name: "web-\(input.metadata.name)", data: {image: input.spec.image, port: input.spec.port}}
	}]
}
"#;

/// `Web` v1beta1 (stored) renames `port` to `listenPort` and makes it a number; v1alpha1 is
/// still served, deprecated, and converted in CUE. `debug` has no place in v1beta1: `lossy`
/// (for example `lossy: ["debug"]`, or nothing) says whether its loss is intended.
pub fn two_version_web(lossy: &str) -> String {
    r#"package web

import "strconv"

#Metadata: kind: "Web"

#Input: {
	image:      string
	listenPort: int & >0 & <65536
}

#Versions: {
	v1beta1: storage: true
	v1alpha1: {
		deprecated:         true
		deprecationWarning: "Web v1alpha1 is deprecated; use v1beta1"
		LOSSY
		#Input: {
			image:  string
			port:   string
			debug?: bool
		}
		#ToStorage: {
			in: #Input
			out: {image: in.image, listenPort: strconv.Atoi(in.port)}
		}
		#FromStorage: {
			in: _
			out: {image: in.image, port: strconv.FormatInt(in.listenPort, 10)}
		}
	}
}

#Render: {
	input: {metadata: {name: string, namespace: string, ...}, spec: #Input}
	output: nodes: [{
		id: "config"
		object: {apiVersion: "v1", kind: "ConfigMap", metadata: name: "web-\(input.metadata.name)", data: {image: input.spec.image, port: "\(input.spec.listenPort)"}}
	}]
}
"#
    .replace("LOSSY", lossy)
}

/// Only v1beta1 is left.
pub fn v1beta1_web() -> String {
    let two = two_version_web("");
    let (start, end) = (
        two.find("#Versions: {").unwrap_or(0),
        two.find("#Render: {").unwrap_or(0),
    );
    // Nothing converts any more: cue refuses an import nobody uses.
    let head = two[..start].replace("import \"strconv\"\n\n", "");
    format!("{head}#Versions: v1beta1: storage: true\n\n{}", &two[end..])
}
