//! Each pinned tool version lives in one place (a go.mod under hack/tools); everything that
//! names it, the code, the README and the development guide, agrees with that place.

use std::path::Path;

fn read(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("read {}: {e}", full.display()))
}

/// The version a go.mod requires of `module`.
fn required(go_mod: &str, module: &str) -> String {
    read(go_mod)
        .lines()
        .map(|l| l.trim().trim_start_matches("require").trim())
        .find_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some(module)).then(|| words.next().map(str::to_string))?
        })
        .unwrap_or_else(|| panic!("{go_mod} does not require {module}"))
}

#[test]
fn the_cue_language_version_is_the_pinned_cue() {
    let pinned = required("hack/tools/cue/go.mod", "cuelang.org/go");
    assert_eq!(pequod::cue::module::CUE_LANGUAGE_VERSION, pinned);
    for doc in ["README.md", "docs/development.md", "docs/cue-modules.md"] {
        assert!(
            read(doc).contains(&format!("cue {pinned}")),
            "{doc} does not name cue {pinned}"
        );
    }
}

#[test]
fn the_docs_name_the_kubernetes_release_the_tests_run() {
    let pinned = required("hack/tools/kubernetes/go.mod", "k8s.io/kubernetes");
    let kwok = required("hack/tools/kwok/go.mod", "sigs.k8s.io/kwok");
    for doc in ["README.md", "docs/development.md"] {
        let text = read(doc);
        assert!(
            text.contains(&format!("Kubernetes {pinned}")),
            "{doc} does not name Kubernetes {pinned}"
        );
        assert!(
            text.contains(&format!("kwok {kwok}")),
            "{doc} does not name kwok {kwok}"
        );
    }
}

#[test]
fn the_readme_names_the_api_surface_the_binary_is_built_for() {
    let manifest = read("Cargo.toml");
    let feature = manifest
        .lines()
        .find(|l| l.starts_with("k8s-openapi"))
        .and_then(|l| l.split('"').find(|w| w.starts_with("v1_")))
        .expect("a k8s-openapi version feature in Cargo.toml");
    assert!(
        read("README.md").contains(&format!("`{feature}`")),
        "the README does not name the k8s-openapi feature {feature}"
    );
}
