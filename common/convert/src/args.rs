//! Flags of `troupe import` and `troupe export`, and the functions the CLI
//! calls with them. The store itself comes from the CLI's own store flags.

use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use troupe_store::{Manifest, ModelRef, ModelRegistry, StoreError};

use crate::{ConvertError, Result};

/// Format of an import source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// `gguf` for a file that starts with the GGUF magic bytes, `hf` for a directory.
    Auto,
    /// A Hugging Face directory: config.json, safetensors weights, tokenizer.json.
    Hf,
    /// A GGUF file as llama.cpp writes it.
    Gguf,
}

/// Flags of `troupe import`.
#[derive(Debug, Clone, Args)]
pub struct ImportArgs {
    /// Model to import: a Hugging Face directory or a .gguf file.
    #[arg(value_name = "SOURCE", env = "TROUPE_IMPORT_SOURCE")]
    pub source: PathBuf,

    /// Registry name to publish under, as its next version. Defaults to the
    /// source's file or directory name without extension, with characters
    /// other than ASCII letters, digits, `-`, `_` and `.` replaced by `-`.
    #[arg(long, value_name = "NAME", env = "TROUPE_IMPORT_NAME")]
    pub name: Option<String>,

    /// Source format.
    #[arg(long, value_enum, default_value_t = Format::Auto, env = "TROUPE_IMPORT_FORMAT")]
    pub format: Format,
}

impl ImportArgs {
    /// Checks the flags; the error lists every problem found.
    pub fn validate(&self) -> Result<()> {
        let mut problems = Vec::new();
        if !self.source.exists() {
            problems.push(format!(
                "SOURCE {}: no such file or directory",
                self.source.display()
            ));
        } else if let Err(problem) = self.resolved_format() {
            problems.push(problem);
        }
        match self.model_name() {
            Ok(name) => {
                if let Err(error) = ModelRef::new(name.clone(), 1)
                    .to_string()
                    .parse::<ModelRef>()
                {
                    problems.push(format!("--name {name}: {error}"));
                }
            }
            Err(problem) => problems.push(problem),
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConvertError::Settings(problems))
        }
    }

    /// Returns the format to read, with `auto` resolved by looking at the source.
    pub fn resolved_format(&self) -> std::result::Result<Format, String> {
        let is_dir = self.source.is_dir();
        match self.format {
            Format::Hf if !is_dir => Err(format!("--format hf: {} is not a directory", self.source.display())),
            Format::Gguf if is_dir => Err(format!("--format gguf: {} is a directory, not a .gguf file", self.source.display())),
            Format::Auto if is_dir => Ok(Format::Hf),
            Format::Auto if has_gguf_magic(&self.source) => Ok(Format::Gguf),
            Format::Auto => Err(format!(
                "{} is neither a directory nor a file starting with the GGUF magic bytes; pass --format",
                self.source.display()
            )),
            explicit => Ok(explicit),
        }
    }

    /// Returns the registry name to publish under.
    pub fn model_name(&self) -> std::result::Result<String, String> {
        if let Some(name) = &self.name {
            return Ok(name.clone());
        }
        default_name(&self.source).ok_or_else(|| {
            format!(
                "cannot derive a model name from {}; pass --name",
                self.source.display()
            )
        })
    }
}

/// Flags of `troupe export`.
#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    /// Stored version to export: NAME for the latest version, or NAME@VERSION (NAME:VERSION also works).
    #[arg(value_name = "MODEL", env = "TROUPE_EXPORT_MODEL")]
    pub model: String,

    /// Directory to write the Hugging Face files into; created if missing.
    #[arg(long, value_name = "DIR", env = "TROUPE_EXPORT_OUT")]
    pub out: PathBuf,
}

impl ExportArgs {
    /// Checks the flags; the error lists every problem found.
    pub fn validate(&self) -> Result<()> {
        let mut problems = Vec::new();
        if let Err(problem) = parse_model_spec(&self.model) {
            problems.push(problem);
        }
        if self.out.exists() && !self.out.is_dir() {
            problems.push(format!(
                "--out {}: exists and is not a directory",
                self.out.display()
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConvertError::Settings(problems))
        }
    }
}

/// Imports `args.source` into `registry` and returns the new version's manifest.
pub async fn run_import(args: &ImportArgs, registry: &ModelRegistry) -> Result<Manifest> {
    args.validate()?;
    let format = args
        .resolved_format()
        .map_err(|problem| ConvertError::Settings(vec![problem]))?;
    let name = args
        .model_name()
        .map_err(|problem| ConvertError::Settings(vec![problem]))?;
    tracing::info!(source = %args.source.display(), ?format, model = %name, "importing model");
    match format {
        Format::Gguf => crate::import_gguf(&args.source, registry, &name).await,
        Format::Hf | Format::Auto => crate::import_hf_dir(&args.source, registry, &name).await,
    }
}

/// Exports the version `args.model` names into `args.out` and returns its manifest.
pub async fn run_export(args: &ExportArgs, registry: &ModelRegistry) -> Result<Manifest> {
    args.validate()?;
    let (name, version) =
        parse_model_spec(&args.model).map_err(|problem| ConvertError::Settings(vec![problem]))?;
    let model = match version {
        Some(version) => ModelRef::new(name, version),
        None => match registry.latest(&name).await? {
            Some(manifest) => manifest.model_ref(),
            None => {
                return Err(ConvertError::Store(StoreError::NotFound {
                    key: format!("{}/{name}", troupe_store::MODELS_PREFIX),
                    resource: format!("any version of model `{name}`"),
                }))
            }
        },
    };
    crate::export_hf_dir(registry, &model, &args.out).await
}

/// Splits `NAME`, `NAME@VERSION` or `NAME:VERSION` and checks both parts.
pub fn parse_model_spec(spec: &str) -> std::result::Result<(String, Option<u64>), String> {
    let (name, version) = match spec.split_once(['@', ':']) {
        Some((name, version)) => (name, Some(version)),
        None => (spec, None),
    };
    let version = version.unwrap_or("1");
    let parsed: ModelRef = format!("{name}@{version}")
        .parse()
        .map_err(|e: StoreError| format!("MODEL {spec}: {e}"))?;
    let explicit = spec.contains(['@', ':']);
    Ok((parsed.name, explicit.then_some(parsed.version)))
}

fn has_gguf_magic(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut file| file.read_exact(&mut magic))
        .is_ok()
        && &magic == b"GGUF"
}

/// Derives a model name from a file or directory name: the extension
/// dropped and the characters model names do not allow replaced.
fn default_name(source: &Path) -> Option<String> {
    let stem = source.file_stem()?.to_string_lossy();
    let name: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let name = name
        .trim_start_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string();
    (!name.is_empty()).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_spec_forms() {
        assert_eq!(
            parse_model_spec("smol").unwrap(),
            ("smol".to_string(), None)
        );
        assert_eq!(
            parse_model_spec("smol@3").unwrap(),
            ("smol".to_string(), Some(3))
        );
        assert_eq!(
            parse_model_spec("smol:3").unwrap(),
            ("smol".to_string(), Some(3))
        );
        for bad in ["", "smol@", "smol@0", "smol:x", "a/b", "@2"] {
            assert!(parse_model_spec(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn default_name_from_file() {
        let name = default_name(Path::new("/tmp/SmolLM2-135M-Instruct.Q4_1.gguf"));
        assert_eq!(name.as_deref(), Some("SmolLM2-135M-Instruct.Q4_1"));
        assert_eq!(
            default_name(Path::new("/models/my model")).as_deref(),
            Some("my-model")
        );
    }

    #[test]
    fn import_args_report_every_problem() {
        let args = ImportArgs {
            source: PathBuf::from("/nonexistent/x.gguf"),
            name: Some("bad name".into()),
            format: Format::Auto,
        };
        let Err(ConvertError::Settings(problems)) = args.validate() else {
            panic!("expected settings errors")
        };
        assert_eq!(problems.len(), 2, "{problems:?}");
    }
}
