//! The layers of the crate, checked from its source: a module may use its own layer and those
//! below, never one above, and the kube-free core never names a Kubernetes client. See the map
//! of the code in docs/development.md.

use std::path::{Path, PathBuf};

/// The top-level modules of `src/`, by layer, ground floor first. Modules of one layer may use
/// each other (`graph` checks readiness expressions, `readiness` asks `graph` which references
/// are sensitive).
const LAYERS: &[(&str, &[&str])] = &[
    (
        "types and names",
        &["api", "error", "lru", "canonical", "naming", "metrics"],
    ),
    ("graph rules", &["graph", "readiness", "rbac"]),
    ("cue", &["cue"]),
    (
        "domain rules and sources",
        &["crd", "rollout", "instance_graph", "executor", "source"],
    ),
    ("kube adapters", &["apply", "authority"]),
    ("process run-time", &["runtime", "conversion"]),
    ("controllers", &["controller"]),
    ("entry points", &["cli", "commands", "operator"]),
];

/// Modules that never talk to the apiserver themselves: what they need from it is handed in.
const KUBE_FREE: &[&str] = &[
    "api",
    "error",
    "lru",
    "canonical",
    "naming",
    "metrics",
    "graph",
    "readiness",
    "rbac",
    "cue",
    "crd",
    "rollout",
    "instance_graph",
    "executor",
    "authority",
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|(_, modules)| modules.contains(&module))
}

/// The production source files, each with its top-level module. `tests.rs` files hold only
/// tests; `lib.rs` and `main.rs` are above every layer.
fn sources() -> Vec<(PathBuf, String)> {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, found);
            } else if path.extension().is_some_and(|e| e == "rs") {
                found.push(path);
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&root, &mut files);
    files.sort();
    files
        .into_iter()
        .filter(|p| !["lib.rs", "main.rs", "tests.rs", "layers.rs"].contains(&p.file_name().unwrap().to_str().unwrap()))
        .map(|p| {
            let relative = p.strip_prefix(&root).unwrap();
            let first = relative.components().next().unwrap().as_os_str().to_str().unwrap();
            let module = first.strip_suffix(".rs").unwrap_or(first).to_string();
            (relative.to_path_buf(), module)
        })
        .collect()
}

/// The lines of production code, numbered from 1: comments dropped, and the file cut where its
/// test module begins.
fn production_lines(path: &Path) -> Vec<(usize, String)> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src").join(path)).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let mut kept = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim();
        let next = lines[i + 1..].iter().map(|l| l.trim()).find(|l| !l.is_empty());
        if trimmed == "#[cfg(test)]" && next.is_some_and(|n| n.starts_with("mod ") || n.starts_with("pub mod ")) {
            break;
        }
        if trimmed.starts_with("//") {
            continue;
        }
        kept.push((i + 1, line.to_string()));
    }
    kept
}

/// The top-level modules a statement names through `crate::`, with `use crate::{a, b::c}`
/// groups spelt out.
fn crate_modules(statement: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = statement;
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // `pequod_crate::`, not this crate
        }
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        found.push(std::mem::take(&mut item));
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
            found.push(item);
        } else {
            found.push(rest.to_string());
        }
    }
    found
        .into_iter()
        .filter_map(|item| {
            let name: String = item
                .trim()
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            (!name.is_empty()).then_some(name)
        })
        .collect()
}

/// Statements (a `use` up to its `;`, any other line alone), each with its first line.
fn statements(lines: &[(usize, String)]) -> Vec<(usize, String)> {
    let mut statements = Vec::new();
    let mut open: Option<(usize, String)> = None;
    for (number, line) in lines {
        let trimmed = line.trim();
        match open.as_mut() {
            Some((_, text)) => text.push_str(trimmed),
            None if trimmed.starts_with("use ")
                || trimmed.starts_with("pub use ")
                || trimmed.starts_with("pub(crate) use ") =>
            {
                open = Some((*number, trimmed.to_string()))
            }
            None => {
                statements.push((*number, trimmed.to_string()));
                continue;
            }
        }
        if trimmed.ends_with(';')
            && let Some(statement) = open.take()
        {
            statements.push(statement);
        }
    }
    statements.extend(open);
    statements
}

fn identifiers(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty())
}

#[test]
fn every_top_level_module_has_a_layer() {
    let mut missing: Vec<String> = sources()
        .into_iter()
        .map(|(_, module)| module)
        .filter(|m| layer_of(m).is_none())
        .collect();
    missing.dedup();
    assert!(
        missing.is_empty(),
        "modules without a layer in src/layers.rs: {missing:?}"
    );
}

#[test]
fn no_module_uses_a_layer_above_its_own() {
    let mut problems = Vec::new();
    for (path, module) in sources() {
        let Some(own) = layer_of(&module) else { continue };
        for (line, statement) in statements(&production_lines(&path)) {
            for used in crate_modules(&statement) {
                match layer_of(&used) {
                    Some(layer) if layer > own => problems.push(format!(
                        "src/{}:{line}: {statement}\n    `{module}` ({}) uses `{used}` ({}), a layer above",
                        path.display(),
                        LAYERS[own].0,
                        LAYERS[layer].0
                    )),
                    _ => {}
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "imports that run up the layers:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_kube_free_core_names_no_client() {
    let mut problems = Vec::new();
    for (path, module) in sources() {
        if !KUBE_FREE.contains(&module.as_str()) {
            continue;
        }
        for (line, statement) in statements(&production_lines(&path)) {
            let names_client = statement.contains("kube::Api")
                || statement.contains("kube::Client")
                || identifiers(&statement).any(|w| w == "Client")
                || (statement.contains("kube::{") && identifiers(&statement).any(|w| w == "Api"));
            if names_client {
                problems.push(format!("src/{}:{line}: {statement}", path.display()));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "the kube-free core names a Kubernetes client (hand it what it needs instead):\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_checks_see_grouped_and_inline_paths() {
    assert_eq!(
        crate_modules("use crate::{api::{Node, names::X}, naming::label_value};"),
        ["api", "naming"]
    );
    assert_eq!(
        crate_modules("let x = crate::cue::run(crate::graph::check(y));"),
        ["cue", "graph"]
    );
    assert_eq!(crate_modules("use pequod_crate::x;"), Vec::<String>::new());
    let lines = vec![
        (3, "use crate::{".to_string()),
        (4, "    apply::Applier,".to_string()),
        (5, "};".to_string()),
    ];
    assert_eq!(statements(&lines), [(3, "use crate::{apply::Applier,};".to_string())]);
}
