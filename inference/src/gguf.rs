//! Opening a GGUF model file: checking that it is one, that it is whole, and
//! that its architecture is one this runtime runs, before any weight is read.
//! Every refusal names the file and the reason.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::QTensor;
use candle_core::Device;

/// Architectures (GGUF `general.architecture`) this runtime runs: the llama
/// family, with Qwen2's attention biases.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama", "qwen2"];

/// Why a model file was refused or failed to load.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file does not start with the GGUF magic.
    #[error(
        "{path}: not a GGUF file (it starts with {magic:?}, a GGUF file starts with \"GGUF\")"
    )]
    NotGguf {
        /// The file.
        path: PathBuf,
        /// The first bytes found.
        magic: String,
    },
    /// The header or metadata does not parse.
    #[error("{path}: damaged GGUF header or metadata: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// The tensor data ends before the header says it should.
    #[error("{path}: truncated: the tensors need {expected} bytes but the file has {actual}; download it again")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Size the header implies.
        expected: u64,
        /// Size on disk.
        actual: u64,
    },
    /// An architecture this runtime does not run.
    #[error("{path}: unsupported architecture {arch:?}; supported: {}", SUPPORTED_ARCHITECTURES.join(", "))]
    UnsupportedArchitecture {
        /// The file.
        path: PathBuf,
        /// `general.architecture`.
        arch: String,
    },
    /// A required metadata key or tensor is missing or of the wrong type.
    #[error("{path}: {what}")]
    Missing {
        /// The file.
        path: PathBuf,
        /// What is missing.
        what: String,
    },
    /// The tokenizer described in the metadata cannot be built.
    #[error("{path}: tokenizer: {reason}")]
    Tokenizer {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A tensor operation failed while loading.
    #[error("{path}: {reason}")]
    Load {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// An opened, checked GGUF file: its metadata, and a reader for its tensors.
pub struct GgufFile {
    path: PathBuf,
    file: File,
    content: Content,
    arch: String,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("arch", &self.arch)
            .finish_non_exhaustive()
    }
}

impl GgufFile {
    /// Opens `path` and checks magic, metadata, size and architecture.
    pub fn open(path: &Path) -> Result<GgufFile, ModelError> {
        let io = |source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = File::open(path).map_err(io)?;
        let actual = file.metadata().map_err(io)?.len();
        let mut magic = [0u8; 4];
        let n = file.read(&mut magic).map_err(io)?;
        if n < 4 || &magic != b"GGUF" {
            return Err(ModelError::NotGguf {
                path: path.to_path_buf(),
                magic: String::from_utf8_lossy(&magic[..n]).into_owned(),
            });
        }
        file.rewind().map_err(io)?;
        let content = Content::read(&mut file).map_err(|e| ModelError::Corrupt {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let expected = content
            .tensor_infos
            .values()
            .map(|t| {
                let elems = t.shape.elem_count() as u64;
                let bytes =
                    elems / t.ggml_dtype.block_size() as u64 * t.ggml_dtype.type_size() as u64;
                content.tensor_data_offset + t.offset + bytes
            })
            .max()
            .unwrap_or(content.tensor_data_offset);
        if expected > actual {
            return Err(ModelError::Truncated {
                path: path.to_path_buf(),
                expected,
                actual,
            });
        }
        let arch = match content.metadata.get("general.architecture") {
            Some(Value::String(a)) => a.clone(),
            _ => {
                return Err(ModelError::Missing {
                    path: path.to_path_buf(),
                    what: "metadata has no general.architecture".into(),
                })
            }
        };
        if !SUPPORTED_ARCHITECTURES.contains(&arch.as_str()) {
            return Err(ModelError::UnsupportedArchitecture {
                path: path.to_path_buf(),
                arch,
            });
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            file,
            content,
            arch,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `general.architecture`.
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// All metadata.
    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn missing(&self, what: String) -> ModelError {
        ModelError::Missing {
            path: self.path.clone(),
            what,
        }
    }

    /// A required integer (any integer type).
    pub fn u64(&self, key: &str) -> Result<u64, ModelError> {
        match self.get(key) {
            Some(Value::U8(v)) => Ok(*v as u64),
            Some(Value::U16(v)) => Ok(*v as u64),
            Some(Value::U32(v)) => Ok(*v as u64),
            Some(Value::U64(v)) => Ok(*v),
            Some(Value::I32(v)) if *v >= 0 => Ok(*v as u64),
            Some(Value::I64(v)) if *v >= 0 => Ok(*v as u64),
            Some(other) => {
                Err(self.missing(format!("metadata {key} is {other:?}, expected an integer")))
            }
            None => Err(self.missing(format!("metadata has no {key}"))),
        }
    }

    /// A required float.
    pub fn f32(&self, key: &str) -> Result<f32, ModelError> {
        match self.get(key) {
            Some(Value::F32(v)) => Ok(*v),
            Some(Value::F64(v)) => Ok(*v as f32),
            Some(other) => {
                Err(self.missing(format!("metadata {key} is {other:?}, expected a float")))
            }
            None => Err(self.missing(format!("metadata has no {key}"))),
        }
    }

    /// A required string.
    pub fn string(&self, key: &str) -> Result<&str, ModelError> {
        match self.get(key) {
            Some(Value::String(v)) => Ok(v),
            Some(other) => {
                Err(self.missing(format!("metadata {key} is {other:?}, expected a string")))
            }
            None => Err(self.missing(format!("metadata has no {key}"))),
        }
    }

    /// A required array.
    pub fn array(&self, key: &str) -> Result<&[Value], ModelError> {
        match self.get(key) {
            Some(Value::Array(v)) => Ok(v),
            Some(other) => {
                Err(self.missing(format!("metadata {key} is {other:?}, expected an array")))
            }
            None => Err(self.missing(format!("metadata has no {key}"))),
        }
    }

    /// Whether a tensor exists.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Reads a tensor onto `device`.
    pub fn tensor(&mut self, name: &str, device: &Device) -> Result<QTensor, ModelError> {
        if !self.has_tensor(name) {
            return Err(self.missing(format!("no tensor {name}")));
        }
        self.content
            .tensor(&mut self.file, name, device)
            .map_err(|e| ModelError::Load {
                path: self.path.clone(),
                reason: format!("tensor {name}: {e}"),
            })
    }
}
