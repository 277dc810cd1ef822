//! Hugging Face safetensors I/O: one `model.safetensors` or shards listed in
//! `model.safetensors.index.json`, read through mmap and copied into a `VarStore`; written
//! atomically, sharded the way `transformers` names shards.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};
use tch::{nn::VarStore, Kind, Tensor};

use crate::error::{read_json, write_atomic, ModelError, Result};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

#[derive(Debug, Serialize, Deserialize)]
struct Index {
    #[serde(default)]
    metadata: serde_json::Map<String, serde_json::Value>,
    weight_map: BTreeMap<String, String>,
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::U8 => Kind::Uint8,
        Dtype::I8 => Kind::Int8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

fn dtype_of(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Uint8 => Dtype::U8,
        Kind::Int8 => Dtype::I8,
        Kind::Bool => Dtype::BOOL,
        _ => return None,
    })
}

/// The weight files of a model directory, memory-mapped.
pub struct WeightFiles {
    files: Vec<(PathBuf, memmap2::Mmap)>,
    /// tensor name → index into `files`
    location: HashMap<String, usize>,
}

impl WeightFiles {
    /// Opens `DIR/model.safetensors.index.json` if present, else `DIR/model.safetensors`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join(INDEX_FILE);
        let names: Vec<PathBuf> = if index_path.exists() {
            let index: Index = read_json(&index_path)?;
            let mut shards: Vec<String> = index.weight_map.values().cloned().collect();
            shards.sort();
            shards.dedup();
            // Shard names come from the file: each must stay inside the model directory, also
            // through symlinks, or a crafted index would map any file of the machine.
            shards
                .into_iter()
                .map(|s| {
                    rlhf_ckpt::join_within(dir, &s).map_err(|e| {
                        ModelError::config(
                            &index_path,
                            "weight_map",
                            format!("shard {e}; name a file inside the model directory"),
                        )
                    })
                })
                .collect::<Result<_>>()?
        } else {
            vec![dir.join(SINGLE_FILE)]
        };
        Self::open_files(names)
    }

    /// Opens one safetensors file of any name (e.g. PEFT's `adapter_model.safetensors`).
    pub fn open_file(path: &Path) -> Result<Self> {
        Self::open_files(vec![path.to_path_buf()])
    }

    fn open_files(names: Vec<PathBuf>) -> Result<Self> {
        let mut files = Vec::with_capacity(names.len());
        let mut location = HashMap::new();
        for (i, path) in names.into_iter().enumerate() {
            let f = std::fs::File::open(&path).map_err(|e| ModelError::io(&path, e))?;
            // SAFETY: the mapping is read-only and lives as long as `self`; a checkpoint file
            // changed under a running reader is outside what any loader can defend against.
            let mmap = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| ModelError::io(&path, e))?;
            let st = SafeTensors::deserialize(&mmap).map_err(|e| ModelError::Tensor {
                path: path.clone(),
                name: "(header)".into(),
                msg: format!("not a valid safetensors file: {e}"),
            })?;
            for name in st.names() {
                location.insert(name.to_string(), i);
            }
            files.push((path, mmap));
        }
        Ok(WeightFiles { files, location })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.location.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.location.contains_key(name)
    }

    /// The path of the file holding `name` (for error messages), or the first file.
    pub fn path_of(&self, name: &str) -> &Path {
        let i = self.location.get(name).copied().unwrap_or(0);
        &self.files[i].0
    }

    /// Reads tensor `name` onto the CPU in its stored dtype.
    pub fn read(&self, name: &str) -> Result<Tensor> {
        let i = *self.location.get(name).ok_or_else(|| {
            ModelError::tensor(self.path_of(name), name, "missing from the checkpoint")
        })?;
        let (path, mmap) = &self.files[i];
        let st = SafeTensors::deserialize(mmap).map_err(|e| {
            ModelError::tensor(path, name, format!("not a valid safetensors file: {e}"))
        })?;
        let view = st
            .tensor(name)
            .map_err(|e| ModelError::tensor(path, name, e.to_string()))?;
        let kind = kind_of(view.dtype()).ok_or_else(|| {
            ModelError::tensor(path, name, format!("unsupported dtype {:?}", view.dtype()))
        })?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        Ok(Tensor::f_from_data_size(view.data(), &shape, kind)?)
    }
}

/// Copies every variable of `vs` from `files`, converting dtype and device. Errors name the file
/// and tensor and give expected vs found shapes. `skip` lists variables that may be absent (they
/// keep their current values). Returns the names in the files that `vs` does not use.
pub fn load_into(vs: &VarStore, files: &WeightFiles, skip: &[&str]) -> Result<Vec<String>> {
    let vars = vs.variables();
    // Check everything before copying anything, so a bad file leaves no half-loaded model.
    let mut plan = Vec::with_capacity(vars.len());
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    for name in names {
        if !files.contains(name) {
            if skip.contains(&name.as_str()) {
                continue;
            }
            return Err(ModelError::tensor(
                files.path_of(name),
                name,
                "missing from the checkpoint (is this the model the config describes?)",
            ));
        }
        plan.push(name.clone());
    }
    let mut loaded = Vec::with_capacity(plan.len());
    for name in &plan {
        let var = &vars[name];
        let t = files.read(name)?;
        if t.size() != var.size() {
            return Err(ModelError::tensor(
                files.path_of(name),
                name,
                format!(
                    "shape mismatch: the config implies {:?}, the file has {:?}",
                    var.size(),
                    t.size()
                ),
            ));
        }
        loaded.push(t);
    }
    tch::no_grad(|| -> Result<()> {
        for (name, t) in plan.iter().zip(loaded) {
            let mut var = vars[name].shallow_clone();
            var.f_copy_(&t.f_to_kind(var.kind())?)?;
        }
        Ok(())
    })?;
    let used: std::collections::HashSet<&str> = vars.keys().map(String::as_str).collect();
    let mut unused: Vec<String> = files
        .names()
        .filter(|n| !used.contains(n))
        .map(str::to_string)
        .collect();
    unused.sort();
    Ok(unused)
}

/// (name, shape, bytes) of one tensor serialised for safetensors.
type Blob = (String, Vec<usize>, Vec<u8>);

/// Named tensors sorted by name (files are byte-reproducible), converted to `dtype` on the CPU.
fn to_blobs(tensors: &[(String, Tensor)], dtype: Kind) -> Result<(Dtype, Vec<Blob>)> {
    let st_dtype = dtype_of(dtype)
        .ok_or_else(|| ModelError::invalid("dtype", format!("{dtype:?}"), "not storable"))?;
    let mut sorted: Vec<&(String, Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut blobs: Vec<Blob> = Vec::with_capacity(sorted.len());
    for (name, t) in sorted {
        let t = t
            .f_detach()?
            .f_to_kind(dtype)?
            .f_to_device(tch::Device::Cpu)?
            .f_contiguous()?;
        let numel = t.numel();
        let mut bytes = vec![0u8; numel * dtype.elt_size_in_bytes()];
        t.f_copy_data_u8(&mut bytes, numel)?;
        let shape = t.size().iter().map(|&d| d as usize).collect();
        blobs.push((name.clone(), shape, bytes));
    }
    Ok((st_dtype, blobs))
}

/// Writes `blobs` as one safetensors file (metadata `format: pt`, as torch's writers put it),
/// atomically.
fn write_blobs<'a>(
    path: &Path,
    st_dtype: Dtype,
    blobs: impl Iterator<Item = &'a Blob>,
) -> Result<()> {
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let views = blobs
        .map(|(name, shape, bytes)| {
            TensorView::new(st_dtype, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| ModelError::tensor(path, name, e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::serialize(views, Some(metadata))
        .map_err(|e| ModelError::tensor(path, "(all)", e.to_string()))?;
    write_atomic(path, &bytes)
}

/// Writes named tensors in `dtype` to the one safetensors file `path` (any name), atomically.
pub fn save_file(path: &Path, tensors: &[(String, Tensor)], dtype: Kind) -> Result<()> {
    let (st_dtype, blobs) = to_blobs(tensors, dtype)?;
    write_blobs(path, st_dtype, blobs.iter())
}

/// Serialises named tensors in `dtype` and writes them to `dir` as `model.safetensors`, or as
/// shards of at most `max_shard_bytes` plus `model.safetensors.index.json`. Every file is written
/// atomically; stale weight files of the other layout are removed.
pub fn save(
    dir: &Path,
    tensors: &[(String, Tensor)],
    dtype: Kind,
    max_shard_bytes: usize,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let (st_dtype, blobs) = to_blobs(tensors, dtype)?;
    let mut shards: Vec<Vec<usize>> = vec![vec![]];
    let mut cur = 0usize;
    for (i, b) in blobs.iter().enumerate() {
        if cur > 0 && cur + b.2.len() > max_shard_bytes {
            shards.push(vec![]);
            cur = 0;
        }
        cur += b.2.len();
        if let Some(last) = shards.last_mut() {
            last.push(i);
        }
    }
    let write_shard = |path: &Path, members: &[usize]| {
        write_blobs(path, st_dtype, members.iter().map(|&i| &blobs[i]))
    };
    let single = dir.join(SINGLE_FILE);
    let index_path = dir.join(INDEX_FILE);
    if shards.len() == 1 {
        write_shard(&single, &shards[0])?;
        remove_stale_shards(dir, None)?;
        if index_path.exists() {
            std::fs::remove_file(&index_path).map_err(|e| ModelError::io(&index_path, e))?;
        }
        return Ok(());
    }
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut shard_names = Vec::with_capacity(n);
    for (k, members) in shards.iter().enumerate() {
        let fname = format!("model-{:05}-of-{:05}.safetensors", k + 1, n);
        write_shard(&dir.join(&fname), members)?;
        for &i in members {
            weight_map.insert(blobs[i].0.clone(), fname.clone());
        }
        shard_names.push(fname);
    }
    let total: usize = blobs.iter().map(|b| b.2.len()).sum();
    let index = Index {
        metadata: [("total_size".to_string(), serde_json::Value::from(total))]
            .into_iter()
            .collect(),
        weight_map,
    };
    let json = serde_json::to_vec_pretty(&index)
        .map_err(|e| ModelError::tensor(&index_path, "(index)", e.to_string()))?;
    write_atomic(&index_path, &json)?;
    remove_stale_shards(dir, Some(&shard_names))?;
    if single.exists() {
        std::fs::remove_file(&single).map_err(|e| ModelError::io(&single, e))?;
    }
    Ok(())
}

fn remove_stale_shards(dir: &Path, keep: Option<&[String]>) -> Result<()> {
    let rd = std::fs::read_dir(dir).map_err(|e| ModelError::io(dir, e))?;
    for entry in rd.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let is_shard = name.starts_with("model-") && name.ends_with(".safetensors");
        if is_shard && !keep.is_some_and(|k| k.contains(&name)) {
            let p = entry.path();
            std::fs::remove_file(&p).map_err(|e| ModelError::io(&p, e))?;
        }
    }
    Ok(())
}
