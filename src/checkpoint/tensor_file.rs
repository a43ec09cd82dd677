//! Reading and writing safetensors files as f32 tensors, with errors that say what is wrong with
//! a damaged file (empty, truncated, not safetensors) instead of the parser's raw complaint.

use super::atomic::write_atomic_with;
use super::convert::{push_f32_as, transpose};
use super::NamedTensor;
use crate::numerics::DType;
use anyhow::{anyhow, bail, Context, Result};
use safetensors::{Dtype, SafeTensors, View};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::Path;

/// What to do about a damaged or missing tensor file; ends every such error.
pub const RECOVERY_HINT: &str = "re-create it (re-run the training that wrote it, or download it \
                                 again) or point halfling at another checkpoint";

/// The safetensors crate refuses headers above 100 MB; a length beyond that means the first eight
/// bytes are not a safetensors header at all.
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// One tensor to write: borrowed f32 values, optionally transposed from `[rows, cols]` on the
/// way out, stored as F32 or BF16. Converting lazily, one tensor at a time, keeps the extra
/// memory of a save to one tensor.
pub struct OutTensor<'a> {
    /// Name in the file.
    pub name: String,
    /// Values in the source layout.
    pub values: &'a [f32],
    /// `Some((rows, cols))`: `values` is a row-major `[rows, cols]` matrix to store as `[cols, rows]`.
    pub transpose_from: Option<(usize, usize)>,
    /// Shape in the file.
    pub file_shape: Vec<usize>,
    /// Store as BF16 (rounded to nearest even) instead of F32.
    pub bf16: bool,
}

impl View for OutTensor<'_> {
    fn dtype(&self) -> Dtype {
        if self.bf16 {
            Dtype::BF16
        } else {
            Dtype::F32
        }
    }

    fn shape(&self) -> &[usize] {
        &self.file_shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let mut bytes = Vec::new();
        match self.transpose_from {
            Some((rows, cols)) => {
                push_f32_as(&transpose(self.values, rows, cols), self.bf16, &mut bytes)
            }
            None => push_f32_as(self.values, self.bf16, &mut bytes),
        }
        Cow::Owned(bytes)
    }

    fn data_len(&self) -> usize {
        self.values.len() * if self.bf16 { 2 } else { 4 }
    }
}

/// Writes `tensors` to `path` as a safetensors file, crash-safely (see [`write_atomic_with`]).
pub fn write_tensor_file(
    path: &Path,
    tensors: Vec<OutTensor<'_>>,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let mut seen = HashSet::new();
    for tensor in &tensors {
        if !seen.insert(tensor.name.as_str()) {
            bail!(
                "cannot write {}: tensor name {} appears twice",
                path.display(),
                tensor.name
            );
        }
        let elements: usize = tensor.file_shape.iter().product();
        if elements != tensor.values.len() {
            bail!(
                "cannot write {}: tensor {} has {} values but its shape {:?} needs {elements}",
                path.display(),
                tensor.name,
                tensor.values.len(),
                tensor.file_shape
            );
        }
    }
    let metadata: HashMap<String, String> = metadata.clone().into_iter().collect();
    let metadata = (!metadata.is_empty()).then_some(metadata);
    write_atomic_with(path, |temp_path| {
        let named = tensors
            .into_iter()
            .map(|tensor| (tensor.name.clone(), tensor));
        safetensors::serialize_to_file(named, metadata, temp_path)
            .map_err(|error| anyhow!("cannot write {}: {error}", temp_path.display()))
    })
}

fn not_safetensors(path: &Path, why: &str) -> anyhow::Error {
    anyhow!(
        "{} is not a safetensors file ({why}); {RECOVERY_HINT}",
        path.display()
    )
}

fn truncated(path: &Path, expected: u64, found: u64) -> anyhow::Error {
    anyhow!(
        "{} is truncated (expected {expected} bytes, found {found}): the save was interrupted or \
         the copy is incomplete; {RECOVERY_HINT}",
        path.display()
    )
}

/// Checks the framing of a safetensors file (header length, header JSON, total size) so the
/// common kinds of damage get a precise message before the full validation runs.
fn check_framing(path: &Path, bytes: &[u8]) -> Result<()> {
    let file_len = bytes.len() as u64;
    let Some(length_bytes) = bytes
        .get(..8)
        .and_then(|head| <[u8; 8]>::try_from(head).ok())
    else {
        bail!(
            "{} is truncated or not a safetensors file: it has only {file_len} bytes; {RECOVERY_HINT}",
            path.display()
        );
    };
    let header_len = u64::from_le_bytes(length_bytes);
    if !(2..=MAX_HEADER_BYTES).contains(&header_len) {
        return Err(not_safetensors(
            path,
            "its first 8 bytes do not give a plausible header length",
        ));
    }
    if bytes.get(8).is_some_and(|&first| first != b'{') {
        return Err(not_safetensors(path, "its header does not start with `{`"));
    }
    let header_end = 8 + header_len;
    let Some(header) = usize::try_from(header_end)
        .ok()
        .and_then(|end| bytes.get(8..end))
    else {
        return Err(truncated(path, header_end, file_len));
    };
    let header = std::str::from_utf8(header)
        .map_err(|_| not_safetensors(path, "its header is not UTF-8 text"))?;
    let entries: serde_json::Map<String, serde_json::Value> = serde_json::from_str(header)
        .map_err(|error| {
            not_safetensors(path, &format!("its header is not valid JSON: {error}"))
        })?;
    let mut data_len = 0u64;
    for (name, entry) in entries.iter().filter(|(name, _)| *name != "__metadata__") {
        let end = entry
            .get("data_offsets")
            .and_then(|offsets| offsets.get(1))
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| not_safetensors(path, &format!("tensor {name} has no data_offsets")))?;
        data_len = data_len.max(end);
    }
    let expected = header_end
        .checked_add(data_len)
        .ok_or_else(|| not_safetensors(path, "its header claims an impossible size"))?;
    if file_len < expected {
        return Err(truncated(path, expected, file_len));
    }
    if file_len > expected {
        bail!(
            "{} has {} bytes after its last tensor, so it is not a valid safetensors file (was it \
             appended to?); {RECOVERY_HINT}",
            path.display(),
            file_len - expected
        );
    }
    Ok(())
}

/// Widens one stored tensor to f32, or says which dtype is not supported.
fn to_f32(path: &Path, name: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>> {
    let as_format = |format| {
        crate::numerics::decode(format, bytes)
            .with_context(|| format!("{}: tensor {name}", path.display()))
    };
    let values = match dtype {
        Dtype::F32 => as_format(DType::F32)?,
        Dtype::BF16 => as_format(DType::BF16)?,
        Dtype::F16 => as_format(DType::F16)?,
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|chunk| {
                let mut eight = [0u8; 8];
                eight.copy_from_slice(chunk);
                f64::from_le_bytes(eight) as f32
            })
            .collect(),
        other => bail!(
            "{}: tensor {name} is stored as {other}, but halfling reads only F32, BF16, F16 and \
             F64 tensors; convert the file to one of those",
            path.display()
        ),
    };
    Ok(values)
}

/// Reads every tensor of a safetensors file whose name passes `keep`, widened to f32 and sorted
/// by name, plus the file's `__metadata__` strings.
pub fn read_tensor_file(
    path: &Path,
    keep: impl Fn(&str) -> bool,
) -> Result<(Vec<NamedTensor>, BTreeMap<String, String>)> {
    let file = File::open(path).map_err(|error| {
        if error.kind() == std::io::ErrorKind::NotFound {
            anyhow!("{} does not exist; {RECOVERY_HINT}", path.display())
        } else {
            anyhow!("cannot open {}: {error}", path.display())
        }
    })?;
    let file_len = file
        .metadata()
        .with_context(|| format!("cannot read {}", path.display()))?
        .len();
    if file_len == 0 {
        bail!(
            "{} is empty (0 bytes): the save was interrupted or the copy is incomplete; {RECOVERY_HINT}",
            path.display()
        );
    }
    // SAFETY: the map is only read, and halfling never rewrites a tensor file in place (every
    // writer goes through a temporary file and a rename), so the mapped bytes do not change under
    // us. Another program truncating the file while we read it could still fault; that is the
    // accepted cost of not holding a second copy of a multi-gigabyte checkpoint in memory.
    let map = unsafe { memmap2::Mmap::map(&file) }
        .with_context(|| format!("cannot map {} into memory", path.display()))?;
    let bytes: &[u8] = &map;
    check_framing(path, bytes)?;
    let invalid = |error| {
        anyhow!(
            "{} is not a valid safetensors file ({error}); {RECOVERY_HINT}",
            path.display()
        )
    };
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(invalid)?;
    let file_tensors = SafeTensors::deserialize(bytes).map_err(invalid)?;

    let metadata: BTreeMap<String, String> = header
        .metadata()
        .as_ref()
        .map(|strings| strings.clone().into_iter().collect())
        .unwrap_or_default();
    let mut tensors = Vec::new();
    for (name, view) in file_tensors.iter().filter(|(name, _)| keep(name)) {
        tensors.push(NamedTensor {
            name: name.to_string(),
            shape: view.shape().to_vec(),
            data: to_f32(path, name, view.dtype(), view.data())?,
        });
    }
    tensors.sort_by(|left, right| left.name.cmp(&right.name));
    Ok((tensors, metadata))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_raw(path: &Path, header: &str, data: &[u8]) {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn reads_f16_bf16_and_f64_tensors_as_f32() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mixed.safetensors");
        let header = r#"{"a":{"dtype":"F16","shape":[2],"data_offsets":[0,4]},"b":{"dtype":"BF16","shape":[2],"data_offsets":[4,8]},"c":{"dtype":"F64","shape":[1],"data_offsets":[8,16]}}"#;
        let mut data = Vec::new();
        for bits in [0x3C00u16, 0xC000, 0x3F80, 0x4049] {
            data.extend_from_slice(&bits.to_le_bytes());
        }
        data.extend_from_slice(&0.25f64.to_le_bytes());
        write_raw(&path, header, &data);
        let (tensors, metadata) = read_tensor_file(&path, |_| true).unwrap();
        assert!(metadata.is_empty());
        assert_eq!(tensors.len(), 3);
        assert_eq!(tensors[0].data, vec![1.0, -2.0]);
        assert_eq!(tensors[1].data, vec![1.0, 3.140625]);
        assert_eq!(tensors[2].data, vec![0.25]);
    }

    #[test]
    fn unsupported_dtype_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ints.safetensors");
        write_raw(
            &path,
            r#"{"steps":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}"#,
            &[0; 8],
        );
        let message = read_tensor_file(&path, |_| true).unwrap_err().to_string();
        assert!(
            message.contains("steps") && message.contains("I64"),
            "{message}"
        );
        // Filtered-out tensors are not converted, so their dtype does not matter.
        assert!(read_tensor_file(&path, |name| name != "steps")
            .unwrap()
            .0
            .is_empty());
    }

    #[test]
    fn huge_header_claims_and_bad_offsets_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.safetensors");
        let mut bytes = u64::MAX.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        std::fs::write(&path, &bytes).unwrap();
        let message = read_tensor_file(&path, |_| true).unwrap_err().to_string();
        assert!(message.contains("not a safetensors file"), "{message}");

        // A header that claims a tensor of 2^62 bytes: reported as truncated, no allocation.
        let header = r#"{"x":{"dtype":"F32","shape":[1152921504606846976],"data_offsets":[0,4611686018427387904]}}"#;
        write_raw(&path, header, &[0; 16]);
        let message = read_tensor_file(&path, |_| true).unwrap_err().to_string();
        assert!(message.contains("truncated"), "{message}");

        // Offsets that disagree with the shape: the full validation catches it.
        write_raw(
            &path,
            r#"{"x":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
            &[0; 8],
        );
        let message = read_tensor_file(&path, |_| true).unwrap_err().to_string();
        assert!(
            message.contains("not a valid safetensors file"),
            "{message}"
        );

        // Bytes after the last tensor.
        write_raw(
            &path,
            r#"{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            &[0; 9],
        );
        let message = read_tensor_file(&path, |_| true).unwrap_err().to_string();
        assert!(
            message.contains("5 bytes after its last tensor"),
            "{message}"
        );
    }
}
