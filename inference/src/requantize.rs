//! A GGUF model written again with its quantised weights in another block
//! format (issue 25's second model: the same weights as Q8_0, a genuinely
//! different file that the runtime serves beside the first).
//!
//! Every block-quantised tensor not already in the target format is
//! dequantised to f32 and quantised again (candle's reference quantisers,
//! as llama.cpp's `quantize` does); f32 and f16 tensors (the norms) are
//! copied. The metadata is copied, with `general.file_type` set to the
//! target and `general.name` saying what was done. The file is written
//! under a temporary name, synced, then renamed: a crash leaves no
//! half-written model under the final name.

use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::Device;

/// Why requantising failed.
#[derive(Debug, thiserror::Error)]
pub enum RequantizeError {
    /// The source could not be read.
    #[error("{path}: {reason}")]
    Read {
        /// The source.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The target could not be written.
    #[error("{path}: {reason}")]
    Write {
        /// The target.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The target format is not one this tool writes.
    #[error("requantising to {0:?} is not supported (Q8_0, Q4_1 or Q4_0)")]
    Unsupported(GgmlDType),
}

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requantized {
    /// Tensors converted.
    pub converted: usize,
    /// Tensors copied as they were.
    pub copied: usize,
    /// The new file's size.
    pub file_bytes: u64,
}

/// llama.cpp's `general.file_type` for a file mostly in `dtype`.
fn file_type(dtype: GgmlDType) -> Option<u32> {
    match dtype {
        GgmlDType::Q4_0 => Some(2),
        GgmlDType::Q4_1 => Some(3),
        GgmlDType::Q8_0 => Some(7),
        _ => None,
    }
}

/// Writes `src` to `dst` with its quantised tensors in `dtype`.
pub fn requantize(
    src: &Path,
    dst: &Path,
    dtype: GgmlDType,
) -> Result<Requantized, RequantizeError> {
    let read_err = |reason: String| RequantizeError::Read {
        path: src.to_path_buf(),
        reason,
    };
    let write_err = |reason: String| RequantizeError::Write {
        path: dst.to_path_buf(),
        reason,
    };
    let file_type = file_type(dtype).ok_or(RequantizeError::Unsupported(dtype))?;
    let mut file = std::fs::File::open(src).map_err(|e| read_err(e.to_string()))?;
    let content = gguf_file::Content::read(&mut file).map_err(|e| read_err(e.to_string()))?;
    let mut metadata: Vec<(String, gguf_file::Value)> = content
        .metadata
        .iter()
        .filter(|(k, _)| k.as_str() != "general.file_type" && k.as_str() != "general.name")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    // The same file for the same source: metadata in a fixed order.
    metadata.sort_by(|a, b| a.0.cmp(&b.0));
    let name = match content.metadata.get("general.name") {
        Some(gguf_file::Value::String(n)) => n.clone(),
        _ => src
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    metadata.push((
        "general.name".into(),
        gguf_file::Value::String(format!("{name} (requantised to {dtype:?})")),
    ));
    metadata.push(("general.file_type".into(), gguf_file::Value::U32(file_type)));
    // Tensors in the order the source stores them.
    let mut names: Vec<(&String, u64)> = content
        .tensor_infos
        .iter()
        .map(|(n, info)| (n, info.offset))
        .collect();
    names.sort_by_key(|(_, offset)| *offset);
    let (mut converted, mut copied) = (0, 0);
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(names.len());
    for (name, _) in names {
        let t = content
            .tensor(&mut file, name, &Device::Cpu)
            .map_err(|e| read_err(format!("tensor {name}: {e}")))?;
        let quantised = !matches!(t.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
        let fits = t
            .shape()
            .dims()
            .last()
            .is_some_and(|&cols| cols % dtype.block_size() == 0);
        if quantised && t.dtype() != dtype && fits {
            let values = t
                .dequantize(&Device::Cpu)
                .map_err(|e| read_err(format!("tensor {name}: {e}")))?;
            let q = QTensor::quantize(&values, dtype)
                .map_err(|e| write_err(format!("tensor {name}: {e}")))?;
            tensors.push((name.clone(), q));
            converted += 1;
        } else {
            tensors.push((name.clone(), t));
            copied += 1;
        }
    }
    let file_bytes = write_atomically(dst, &metadata, &tensors).map_err(write_err)?;
    Ok(Requantized {
        converted,
        copied,
        file_bytes,
    })
}

/// Writes a GGUF file under a temporary name, syncs it, then renames it to
/// `dst` (a crash leaves no half-written model under that name); its size.
pub(crate) fn write_atomically(
    dst: &Path,
    metadata: &[(String, gguf_file::Value)],
    tensors: &[(String, QTensor)],
) -> Result<u64, String> {
    let tmp = dst.with_extension("gguf.partial");
    let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(|e| e.to_string())?);
    let meta: Vec<(&str, &gguf_file::Value)> =
        metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tens: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut out, &meta, &tens).map_err(|e| e.to_string())?;
    let out = out.into_inner().map_err(|e| e.to_string())?;
    out.sync_all().map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, dst).map_err(|e| e.to_string())?;
    Ok(std::fs::metadata(dst).map_err(|e| e.to_string())?.len())
}
