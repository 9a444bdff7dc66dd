//! Platform modules compiled into the binary, from `cue/platform/<name>/*.cue`.

/// (module name, [(file name, content)]). A unit test keeps this list equal to the folder.
const MODULES: &[(&str, &[(&str, &str)])] = &[
    (
        "database",
        &[
            ("policy.cue", include_str!("../../cue/platform/database/policy.cue")),
            ("render.cue", include_str!("../../cue/platform/database/render.cue")),
            ("schema.cue", include_str!("../../cue/platform/database/schema.cue")),
        ],
    ),
    (
        "webservice",
        &[
            ("policy.cue", include_str!("../../cue/platform/webservice/policy.cue")),
            ("render.cue", include_str!("../../cue/platform/webservice/render.cue")),
            ("schema.cue", include_str!("../../cue/platform/webservice/schema.cue")),
        ],
    ),
    (
        "webapp",
        &[
            ("policy.cue", include_str!("../../cue/platform/webapp/policy.cue")),
            ("render.cue", include_str!("../../cue/platform/webapp/render.cue")),
            ("schema.cue", include_str!("../../cue/platform/webapp/schema.cue")),
        ],
    ),
    (
        "worker",
        &[
            ("policy.cue", include_str!("../../cue/platform/worker/policy.cue")),
            ("render.cue", include_str!("../../cue/platform/worker/render.cue")),
            ("schema.cue", include_str!("../../cue/platform/worker/schema.cue")),
        ],
    ),
];

/// Names of the embedded modules.
pub fn names() -> impl Iterator<Item = &'static str> {
    MODULES.iter().map(|(name, _)| *name)
}

/// Files of the embedded module `name`.
pub fn files(name: &str) -> Option<impl Iterator<Item = (&'static str, &'static str)>> {
    MODULES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, files)| files.iter().copied())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn every_module_folder_and_file_is_embedded() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("cue/platform");
        let mut on_disk = BTreeSet::new();
        for module in std::fs::read_dir(&root).unwrap() {
            let module = module.unwrap();
            let name = module.file_name().into_string().unwrap();
            for file in std::fs::read_dir(module.path()).unwrap() {
                let file = file.unwrap().file_name().into_string().unwrap();
                if file.ends_with(".cue") {
                    on_disk.insert((name.clone(), file));
                }
            }
        }
        let embedded: BTreeSet<(String, String)> = MODULES
            .iter()
            .flat_map(|(m, files)| files.iter().map(|(f, _)| (m.to_string(), f.to_string())))
            .collect();
        assert_eq!(embedded, on_disk, "update src/cue/embedded.rs to match cue/platform");
    }
}
