//! Reading a module's `.cue` files out of a zip (CUE's module artifact) or a tar archive
//! (plain or gzip-compressed), in memory and within fixed limits.

use std::collections::BTreeMap;
use std::io::{Cursor, Read};

use super::reference::ModulePath;
use crate::cue::{ModuleError, ModuleFiles, module::MAX_MODULE_BYTES};

/// Most bytes a tar archive may expand to; larger ones are refused rather than read.
pub const MAX_EXPANDED_BYTES: u64 = 64 * 1024 * 1024;
/// Most entries an archive may hold.
pub const MAX_ENTRIES: usize = 20_000;

/// Archive formats a module can come in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveFormat {
    Zip,
    Tar,
    TarGzip,
}

/// Why an archive gave no module.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArchiveError {
    #[error("unreadable {format} archive: {message}")]
    Corrupt { format: &'static str, message: String },
    #[error("the archive expands to more than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("the archive has more than {limit} entries")]
    TooManyEntries { limit: usize },
    #[error("no .cue files in folder {path} of the {what} (found: {found})")]
    NoModule { path: String, what: String, found: String },
    #[error("{0}")]
    Module(#[from] ModuleError),
}

/// The `.cue` files directly inside `path` of an archive. `what` names the archive in messages.
pub fn module_files(
    format: ArchiveFormat,
    bytes: &[u8],
    path: &ModulePath,
    what: &str,
) -> Result<ModuleFiles, ArchiveError> {
    let mut selected = BTreeMap::new();
    let mut folders = std::collections::BTreeSet::new();
    // The module's files together stay within the module limit, whatever their number: many
    // small, highly compressed files must not add up to a heap-filling module.
    let mut module_bytes = 0usize;
    let mut take = |name: &str, read: &mut dyn FnMut(&mut String) -> Result<(), ArchiveError>| {
        let name = name.trim_start_matches("./");
        let (folder, file) = name.rsplit_once('/').unwrap_or(("", name));
        if !file.ends_with(".cue") {
            return Ok(());
        }
        folders.insert(if folder.is_empty() {
            "/".to_string()
        } else {
            folder.to_string()
        });
        if folder != path.as_str() {
            return Ok(());
        }
        let mut content = String::new();
        read(&mut content)?;
        module_bytes += content.len();
        if module_bytes > MAX_MODULE_BYTES {
            return Err(ModuleError::TooLarge {
                bytes: module_bytes,
                limit: MAX_MODULE_BYTES,
            }
            .into());
        }
        selected.insert(file.to_string(), content);
        Ok(())
    };
    match format {
        ArchiveFormat::Zip => read_zip(bytes, &mut take)?,
        ArchiveFormat::Tar => read_tar(bytes, &mut take)?,
        ArchiveFormat::TarGzip => read_tar(flate2::read::GzDecoder::new(bytes), &mut take)?,
    }
    if selected.is_empty() {
        let mut found: Vec<String> = folders.into_iter().take(10).collect();
        if found.is_empty() {
            found.push("no .cue files at all".to_string());
        }
        return Err(ArchiveError::NoModule {
            path: path.to_string(),
            what: what.to_string(),
            found: found.join(", "),
        });
    }
    Ok(ModuleFiles::new(selected)?)
}

type Take<'a> =
    dyn FnMut(&str, &mut dyn FnMut(&mut String) -> Result<(), ArchiveError>) -> Result<(), ArchiveError> + 'a;

/// Reads at most the module limit plus one byte, so an oversized file is refused, not read whole.
fn read_limited(reader: impl Read, out: &mut String, format: &'static str) -> Result<(), ArchiveError> {
    let limit = MAX_MODULE_BYTES as u64;
    reader
        .take(limit + 1)
        .read_to_string(out)
        .map_err(|e| corrupt(format, e))?;
    if out.len() as u64 > limit {
        return Err(ModuleError::TooLarge {
            bytes: out.len(),
            limit: MAX_MODULE_BYTES,
        }
        .into());
    }
    Ok(())
}

fn corrupt(format: &'static str, e: impl std::fmt::Display) -> ArchiveError {
    ArchiveError::Corrupt {
        format,
        message: e.to_string(),
    }
}

fn read_zip(bytes: &[u8], take: &mut Take<'_>) -> Result<(), ArchiveError> {
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes)).map_err(|e| corrupt("zip", e))?;
    if zip.len() > MAX_ENTRIES {
        return Err(ArchiveError::TooManyEntries { limit: MAX_ENTRIES });
    }
    for index in 0..zip.len() {
        let mut entry = zip.by_index(index).map_err(|e| corrupt("zip", e))?;
        if !entry.is_file() {
            continue;
        }
        let name = entry.name().to_string();
        take(&name, &mut |out| read_limited(&mut entry, out, "zip"))?;
    }
    Ok(())
}

fn read_tar(reader: impl Read, take: &mut Take<'_>) -> Result<(), ArchiveError> {
    let counted = LimitedReader {
        inner: reader,
        remaining: MAX_EXPANDED_BYTES,
    };
    let mut archive = tar::Archive::new(counted);
    let entries = archive.entries().map_err(|e| corrupt("tar", e))?;
    for (count, entry) in entries.enumerate() {
        if count >= MAX_ENTRIES {
            return Err(ArchiveError::TooManyEntries { limit: MAX_ENTRIES });
        }
        let mut entry = entry.map_err(tar_error)?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let name = entry.path().map_err(tar_error)?.to_string_lossy().into_owned();
        take(&name, &mut |out| read_limited(&mut entry, out, "tar"))?;
    }
    Ok(())
}

fn tar_error(e: std::io::Error) -> ArchiveError {
    if e.kind() == std::io::ErrorKind::FileTooLarge {
        ArchiveError::TooLarge {
            limit: MAX_EXPANDED_BYTES,
        }
    } else {
        corrupt("tar", e)
    }
}

/// Fails reads past a byte budget, so a compressed archive cannot expand without bound.
struct LimitedReader<R> {
    inner: R,
    remaining: u64,
}

impl<R: Read> Read for LimitedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.remaining == 0 {
            // One byte more than the budget tells a full archive from one that ends exactly here.
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => Err(std::io::Error::new(
                    std::io::ErrorKind::FileTooLarge,
                    "archive too large",
                )),
            };
        }
        let max = buf.len().min(self.remaining.min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..max])?;
        self.remaining -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::Write;

    use super::*;

    pub(crate) fn tar_gz(files: &[(&str, &str)]) -> Vec<u8> {
        let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
        for (name, content) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(content.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder.append_data(&mut header, name, content.as_bytes()).unwrap();
        }
        builder.into_inner().unwrap().finish().unwrap()
    }

    pub(crate) fn zip(files: &[(&str, &str)]) -> Vec<u8> {
        let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
        for (name, content) in files {
            writer
                .start_file(*name, zip::write::SimpleFileOptions::default())
                .unwrap();
            writer.write_all(content.as_bytes()).unwrap();
        }
        writer.finish().unwrap().into_inner()
    }

    fn root() -> ModulePath {
        ModulePath::parse(None).unwrap()
    }

    #[test]
    fn cue_module_zip_gives_its_root_package() {
        let bytes = zip(&[
            ("cue.mod/module.cue", "module: \"example.com/web@v0\"\n"),
            ("schema.cue", "package web\n#Input: {}\n"),
            ("render.cue", "package web\n"),
            ("README.md", "not cue"),
            ("sub/other.cue", "package other\n"),
        ]);
        let files = module_files(ArchiveFormat::Zip, &bytes, &root(), "artifact").unwrap();
        let names: Vec<_> = files.files().keys().cloned().collect();
        assert_eq!(names, ["render.cue", "schema.cue"]);
    }

    #[test]
    fn tar_gz_with_a_path_selects_that_folder() {
        let bytes = tar_gz(&[
            ("./platforms/web/a.cue", "package web\n"),
            ("platforms/web/deep/b.cue", "package deep\n"),
            ("platforms/worker/c.cue", "package worker\n"),
        ]);
        let path = ModulePath::parse(Some("platforms/web")).unwrap();
        let files = module_files(ArchiveFormat::TarGzip, &bytes, &path, "artifact").unwrap();
        assert_eq!(files.files().keys().collect::<Vec<_>>(), ["a.cue"]);

        let missing = ModulePath::parse(Some("platforms/none")).unwrap();
        let err = module_files(ArchiveFormat::TarGzip, &bytes, &missing, "commit abc").unwrap_err();
        let message = err.to_string();
        assert!(message.contains("platforms/none"), "{message}");
        assert!(message.contains("platforms/worker"), "{message}");
        assert!(message.contains("commit abc"), "{message}");
    }

    #[test]
    fn corrupt_and_oversized_archives_are_refused() {
        assert!(matches!(
            module_files(ArchiveFormat::Zip, b"not a zip", &root(), "x"),
            Err(ArchiveError::Corrupt { .. })
        ));
        assert!(matches!(
            module_files(ArchiveFormat::TarGzip, b"not gzip", &root(), "x"),
            Err(ArchiveError::Corrupt { .. })
        ));
        let big = "x".repeat(MAX_MODULE_BYTES + 10);
        let bytes = zip(&[("big.cue", big.as_str())]);
        assert!(matches!(
            module_files(ArchiveFormat::Zip, &bytes, &root(), "x"),
            Err(ArchiveError::Module(ModuleError::TooLarge { .. }))
        ));
    }

    #[test]
    fn many_files_within_the_file_limit_still_add_up_to_the_module_limit() {
        let part = "x".repeat(MAX_MODULE_BYTES / 2 + 1);
        let names: Vec<String> = (0..3).map(|i| format!("part{i}.cue")).collect();
        let files: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), part.as_str())).collect();
        let bytes = zip(&files);
        assert!(
            bytes.len() < 64 * 1024,
            "a small archive ({} bytes) that would expand past the limit",
            bytes.len()
        );
        assert!(matches!(
            module_files(ArchiveFormat::Zip, &bytes, &root(), "x"),
            Err(ArchiveError::Module(ModuleError::TooLarge { .. }))
        ));
        assert!(matches!(
            module_files(ArchiveFormat::TarGzip, &tar_gz(&files), &root(), "x"),
            Err(ArchiveError::Module(ModuleError::TooLarge { .. }))
        ));
    }

    #[test]
    fn expansion_is_bounded() {
        let mut reader = LimitedReader {
            inner: Cursor::new(vec![0u8; 100]),
            remaining: 64,
        };
        let mut out = Vec::new();
        let err = reader.read_to_end(&mut out).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::FileTooLarge);
        let mut exact = LimitedReader {
            inner: Cursor::new(vec![0u8; 64]),
            remaining: 64,
        };
        assert_eq!(exact.read_to_end(&mut Vec::new()).unwrap(), 64);
    }
}
