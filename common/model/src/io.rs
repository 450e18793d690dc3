//! Safetensors encoding of named tensors, and file helpers whose errors name the path.

use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype, View};
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

/// One tensor copied out as little-endian bytes for the safetensors writer.
struct RawTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &RawTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn raw_tensor(name: &str, tensor: &Tensor) -> Result<RawTensor> {
    let flat = tensor.flatten_all()?;
    let (dtype, bytes) = match tensor.dtype() {
        DType::F32 => (
            Dtype::F32,
            flat.to_vec1::<f32>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        DType::F64 => (
            Dtype::F64,
            flat.to_vec1::<f64>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        DType::U32 => (
            Dtype::U32,
            flat.to_vec1::<u32>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        DType::I64 => (
            Dtype::I64,
            flat.to_vec1::<i64>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        other => {
            return Err(Error::Tensor {
                name: name.into(),
                reason: format!("cannot write dtype {other:?}"),
            });
        }
    };
    Ok(RawTensor {
        dtype,
        shape: tensor.dims().to_vec(),
        bytes,
    })
}

/// Encodes named tensors (f32, f64, u32 or i64) as a safetensors buffer with optional string metadata.
pub fn write_safetensors(
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let raw = tensors
        .iter()
        .map(|(name, tensor)| Ok((name.clone(), raw_tensor(name, tensor)?)))
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(raw.iter().map(|(name, t)| (name.as_str(), t)), metadata)
        .map_err(|e| Error::Safetensors(e.to_string()))
}

/// Decodes every tensor of a safetensors buffer onto `device`.
pub fn read_safetensors(bytes: &[u8], device: &Device) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load_buffer(bytes, device)
        .map_err(|e| Error::Safetensors(e.to_string()))
}

/// Reads the string metadata (`__metadata__`) of a safetensors buffer.
pub fn read_safetensors_metadata(bytes: &[u8]) -> Result<HashMap<String, String>> {
    let (_, metadata) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| Error::Safetensors(e.to_string()))?;
    Ok(metadata.metadata().clone().unwrap_or_default())
}

pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// Writes through a temporary sibling and a rename, so a reader never sees half a file.
pub(crate) fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".partial");
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}
