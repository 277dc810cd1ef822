//! Tensors on the wire: [`to_wire`] / [`from_wire`] convert between `tch::Tensor` and
//! `pb::Tensor` (dtype, shape, little-endian row-major bytes), checking every size so a corrupt
//! or truncated message is an error naming the field, never a wrong tensor. Large tensors are cut
//! into [`pb::WeightChunk`]s by [`chunks`] and put back together by [`WeightAssembler`].

use tch::{Device, Kind, Tensor};

use crate::pb;

// Every supported target is little-endian; a big-endian port would need byte swaps here.
const _: () = assert!(cfg!(target_endian = "little"));

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("tensor `{field}`: missing from the message")]
    Missing { field: String },
    #[error("tensor `{field}`: unsupported dtype {dtype}")]
    Dtype { field: String, dtype: String },
    #[error("tensor `{field}`: shape {shape:?} needs {expected} bytes, message has {found}")]
    Size {
        field: String,
        shape: Vec<i64>,
        expected: u64,
        found: u64,
    },
    #[error("tensor `{field}`: negative dimension in shape {shape:?}")]
    Shape { field: String, shape: Vec<i64> },
    #[error("weight stream: {0}")]
    Stream(String),
    #[error("tensor `{field}`: {source}")]
    Torch {
        field: String,
        #[source]
        source: tch::TchError,
    },
}

fn torch(field: &str) -> impl FnOnce(tch::TchError) -> WireError + '_ {
    move |source| WireError::Torch {
        field: field.to_string(),
        source,
    }
}

/// The wire dtype of a tch kind.
pub fn dtype_of(kind: Kind) -> Option<pb::Dtype> {
    Some(match kind {
        Kind::Float => pb::Dtype::F32,
        Kind::Half => pb::Dtype::F16,
        Kind::BFloat16 => pb::Dtype::Bf16,
        Kind::Double => pb::Dtype::F64,
        Kind::Int64 => pb::Dtype::I64,
        Kind::Int => pb::Dtype::I32,
        Kind::Uint8 => pb::Dtype::U8,
        Kind::Bool => pb::Dtype::Bool,
        _ => return None,
    })
}

/// The tch kind of a wire dtype.
pub fn kind_of(dtype: pb::Dtype) -> Option<Kind> {
    Some(match dtype {
        pb::Dtype::F32 => Kind::Float,
        pb::Dtype::F16 => Kind::Half,
        pb::Dtype::Bf16 => Kind::BFloat16,
        pb::Dtype::F64 => Kind::Double,
        pb::Dtype::I64 => Kind::Int64,
        pb::Dtype::I32 => Kind::Int,
        pb::Dtype::U8 => Kind::Uint8,
        pb::Dtype::Bool => Kind::Bool,
        pb::Dtype::Unspecified => return None,
    })
}

fn byte_len(field: &str, shape: &[i64], kind: Kind) -> Result<u64, WireError> {
    let mut n: u64 = 1;
    for &d in shape {
        if d < 0 {
            return Err(WireError::Shape {
                field: field.into(),
                shape: shape.to_vec(),
            });
        }
        n = n.saturating_mul(d as u64);
    }
    Ok(n.saturating_mul(kind.elt_size_in_bytes() as u64))
}

/// Little-endian bytes of a tensor (moved to the CPU and made contiguous first).
pub fn tensor_bytes(field: &str, t: &Tensor) -> Result<(Kind, Vec<i64>, Vec<u8>), WireError> {
    let kind = t.f_kind().map_err(torch(field))?;
    if dtype_of(kind).is_none() {
        return Err(WireError::Dtype {
            field: field.into(),
            dtype: format!("{kind:?}"),
        });
    }
    let t = t
        .f_to_device(Device::Cpu)
        .and_then(|t| t.f_contiguous())
        .map_err(torch(field))?;
    let shape = t.size();
    let numel = t.numel();
    let mut data = vec![0u8; numel * kind.elt_size_in_bytes()];
    if numel > 0 {
        t.f_copy_data_u8(&mut data, numel).map_err(torch(field))?;
    }
    Ok((kind, shape, data))
}

/// A tensor as a wire message.
pub fn to_wire(field: &str, t: &Tensor) -> Result<pb::Tensor, WireError> {
    let (kind, shape, data) = tensor_bytes(field, t)?;
    Ok(pb::Tensor {
        dtype: dtype_of(kind).map(|d| d as i32).unwrap_or_default(),
        shape,
        data,
    })
}

/// A wire message as a CPU tensor; `field` names it in errors.
pub fn from_wire(field: &str, t: &pb::Tensor) -> Result<Tensor, WireError> {
    let dtype = pb::Dtype::try_from(t.dtype).unwrap_or(pb::Dtype::Unspecified);
    let kind = kind_of(dtype).ok_or_else(|| WireError::Dtype {
        field: field.into(),
        dtype: format!("{} ({})", t.dtype, dtype.as_str_name()),
    })?;
    from_bytes(field, kind, &t.shape, &t.data)
}

fn from_bytes(field: &str, kind: Kind, shape: &[i64], data: &[u8]) -> Result<Tensor, WireError> {
    let expected = byte_len(field, shape, kind)?;
    if expected != data.len() as u64 {
        return Err(WireError::Size {
            field: field.into(),
            shape: shape.to_vec(),
            expected,
            found: data.len() as u64,
        });
    }
    if expected == 0 {
        return Tensor::f_zeros(shape, (kind, Device::Cpu)).map_err(torch(field));
    }
    Tensor::f_from_data_size(data, shape, kind).map_err(torch(field))
}

/// `from_wire` for a field that must be present.
pub fn required(field: &str, t: Option<&pb::Tensor>) -> Result<Tensor, WireError> {
    from_wire(
        field,
        t.ok_or_else(|| WireError::Missing {
            field: field.into(),
        })?,
    )
}

/// `from_wire` for an optional field: absent stays `None`.
pub fn optional(field: &str, t: Option<&pb::Tensor>) -> Result<Option<Tensor>, WireError> {
    t.map(|t| from_wire(field, t)).transpose()
}

/// Cuts one named tensor into chunks of at most `chunk_bytes` bytes (one chunk for an empty
/// tensor, so every tensor announces itself).
pub fn chunks(
    name: &str,
    t: &Tensor,
    chunk_bytes: usize,
) -> Result<Vec<pb::WeightChunk>, WireError> {
    let (kind, shape, data) = tensor_bytes(name, t)?;
    let dtype = dtype_of(kind).map(|d| d as i32).unwrap_or_default();
    let total = data.len() as u64;
    let pieces: Vec<&[u8]> = if data.is_empty() {
        vec![&data[..]]
    } else {
        data.chunks(chunk_bytes.max(1)).collect()
    };
    let mut offset = 0u64;
    Ok(pieces
        .into_iter()
        .map(|p| {
            let c = pb::WeightChunk {
                role_id: String::new(),
                name: name.to_string(),
                dtype,
                shape: shape.clone(),
                offset,
                data: p.to_vec(),
                total_bytes: total,
            };
            offset += p.len() as u64;
            c
        })
        .collect())
}

/// A tensor being received: name, dtype, shape, bytes so far, total bytes.
type Partial = (String, Kind, Vec<i64>, Vec<u8>, u64);

/// Reassembles tensors from a chunk stream. Chunks of one tensor must arrive in order and
/// contiguously; a gap, an overlap, a changed dtype/shape or a tensor left incomplete is an error
/// naming the tensor. The sizes a sender declares are checked against the assembler's limit
/// before anything is allocated for them: a 1-byte chunk declaring a 1 TiB tensor is an error,
/// not an abort.
pub struct WeightAssembler {
    current: Option<Partial>,
    done: Vec<(String, Tensor)>,
    /// Bytes of the finished tensors plus the declared size of the current one.
    bytes: u64,
    max_bytes: u64,
}

impl WeightAssembler {
    /// An assembler accepting at most `max_bytes` in all (the declared sizes of every tensor
    /// together): the receiver's model size, so that no sender can make it allocate more.
    pub fn with_limit(max_bytes: u64) -> Self {
        WeightAssembler {
            current: None,
            done: Vec::new(),
            bytes: 0,
            max_bytes,
        }
    }

    /// Adds one chunk.
    pub fn push(&mut self, c: pb::WeightChunk) -> Result<(), WireError> {
        let starts_new = match &self.current {
            Some((name, ..)) => *name != c.name,
            None => true,
        };
        if starts_new {
            self.finish_current()?;
            if c.offset != 0 {
                return Err(WireError::Stream(format!(
                    "tensor `{}` starts at offset {} instead of 0",
                    c.name, c.offset
                )));
            }
            let dtype = pb::Dtype::try_from(c.dtype).unwrap_or(pb::Dtype::Unspecified);
            let kind = kind_of(dtype).ok_or_else(|| WireError::Dtype {
                field: c.name.clone(),
                dtype: format!("{}", c.dtype),
            })?;
            let expected = byte_len(&c.name, &c.shape, kind)?;
            if expected != c.total_bytes {
                return Err(WireError::Size {
                    field: c.name,
                    shape: c.shape,
                    expected,
                    found: c.total_bytes,
                });
            }
            let total = self.bytes.saturating_add(expected);
            if total > self.max_bytes {
                return Err(WireError::Stream(format!(
                    "tensor `{}` declares shape {:?} ({expected} bytes), which brings the stream \
                     to {total} bytes, over the {} bytes this receiver's model holds; the sender \
                     has another model",
                    c.name, c.shape, self.max_bytes
                )));
            }
            if (c.data.len() as u64) > expected {
                return Err(WireError::Stream(format!(
                    "tensor `{}`: a chunk of {} bytes for a tensor of {expected}",
                    c.name,
                    c.data.len()
                )));
            }
            self.bytes = total;
            // Checked against the limit above, so this reservation is bounded by the model.
            let mut buf = Vec::with_capacity(expected as usize);
            buf.extend_from_slice(&c.data);
            self.current = Some((c.name, kind, c.shape, buf, expected));
        } else if let Some((name, _, shape, buf, total)) = self.current.as_mut() {
            if c.offset != buf.len() as u64 || c.shape != *shape || c.total_bytes != *total {
                return Err(WireError::Stream(format!(
                    "tensor `{name}`: chunk at offset {} does not continue the {} bytes received",
                    c.offset,
                    buf.len()
                )));
            }
            // Checked before copying, so the buffer never grows past its reserved size.
            let after = buf.len() as u64 + c.data.len() as u64;
            if after > *total {
                return Err(WireError::Stream(format!(
                    "tensor `{name}`: {after} bytes received, more than its {total}"
                )));
            }
            buf.extend_from_slice(&c.data);
        }
        Ok(())
    }

    fn finish_current(&mut self) -> Result<(), WireError> {
        if let Some((name, kind, shape, buf, total)) = self.current.take() {
            if buf.len() as u64 != total {
                return Err(WireError::Stream(format!(
                    "tensor `{name}` ended after {} of its {total} bytes",
                    buf.len()
                )));
            }
            let t = from_bytes(&name, kind, &shape, &buf)?;
            if self.done.iter().any(|(n, _)| *n == name) {
                return Err(WireError::Stream(format!("tensor `{name}` sent twice")));
            }
            self.done.push((name, t));
        }
        Ok(())
    }

    /// The tensors received, in order, and their total bytes.
    pub fn finish(mut self) -> Result<(Vec<(String, Tensor)>, u64), WireError> {
        self.finish_current()?;
        Ok((self.done, self.bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_dtype_bitwise() {
        let base = Tensor::randn([3, 5], (Kind::Float, Device::Cpu));
        for kind in [
            Kind::Float,
            Kind::Half,
            Kind::BFloat16,
            Kind::Double,
            Kind::Int64,
            Kind::Int,
            Kind::Uint8,
            Kind::Bool,
        ] {
            let t = (&base * 10).to_kind(kind);
            let back = from_wire("t", &to_wire("t", &t).unwrap()).unwrap();
            assert_eq!(back.kind(), kind);
            assert_eq!(back.size(), [3, 5]);
            assert!(back.equal(&t), "{kind:?}");
        }
        // Non-contiguous input and an empty tensor.
        let tt = base.tr();
        assert!(from_wire("t", &to_wire("t", &tt).unwrap())
            .unwrap()
            .equal(&tt));
        let e = Tensor::zeros([0, 4], (Kind::Float, Device::Cpu));
        assert_eq!(
            from_wire("e", &to_wire("e", &e).unwrap()).unwrap().size(),
            [0, 4]
        );
    }

    #[test]
    fn corrupt_messages_are_errors_naming_the_field() {
        let mut m = to_wire("x", &Tensor::ones([2, 2], (Kind::Float, Device::Cpu))).unwrap();
        m.data.pop();
        let e = from_wire("advantages", &m).unwrap_err().to_string();
        assert!(e.contains("advantages") && e.contains("16 bytes"), "{e}");
        m.dtype = 0;
        assert!(from_wire("x", &m)
            .unwrap_err()
            .to_string()
            .contains("dtype"));
        assert!(required("old_logprobs", None)
            .unwrap_err()
            .to_string()
            .contains("old_logprobs"));
    }

    #[test]
    fn chunked_weights_reassemble_and_gaps_are_caught() {
        let a = Tensor::randn([100, 7], (Kind::Float, Device::Cpu));
        let b = Tensor::arange(10, (Kind::Int64, Device::Cpu));
        let mut all = chunks("a", &a, 256).unwrap();
        assert_eq!(all.len(), 11); // 2800 bytes in 256-byte pieces
        all.extend(chunks("b", &b, 256).unwrap());
        let mut asm = WeightAssembler::with_limit(1 << 20);
        for c in all.clone() {
            asm.push(c).unwrap();
        }
        let (ts, bytes) = asm.finish().unwrap();
        assert_eq!(bytes, 2800 + 80);
        assert!(ts[0].1.equal(&a) && ts[1].1.equal(&b));
        // Drop a middle chunk: the next one no longer continues the tensor.
        let mut asm = WeightAssembler::with_limit(1 << 20);
        let mut gap = all.clone();
        gap.remove(3);
        let err = gap.into_iter().try_for_each(|c| asm.push(c)).unwrap_err();
        assert!(err.to_string().contains("tensor `a`"), "{err}");
        // Stop early: the tensor is incomplete.
        let mut asm = WeightAssembler::with_limit(1 << 20);
        for c in all.into_iter().take(5) {
            asm.push(c).unwrap();
        }
        assert!(asm
            .finish()
            .unwrap_err()
            .to_string()
            .contains("ended after"));
    }

    #[test]
    fn a_chunk_declaring_a_terabyte_is_refused_before_allocating() {
        let huge = pb::WeightChunk {
            role_id: "actor".into(),
            name: "model.embed_tokens.weight".into(),
            dtype: pb::Dtype::U8 as i32,
            shape: vec![1 << 40],
            offset: 0,
            data: vec![0],
            total_bytes: 1 << 40,
        };
        // Reserving the declared size before checking it (as the assembler once did) would
        // abort the process right here.
        let mut asm = WeightAssembler::with_limit(1 << 30);
        let e = asm.push(huge).unwrap_err().to_string();
        assert!(
            e.contains("model.embed_tokens.weight") && e.contains("1073741824 bytes"),
            "{e}"
        );
        // The limit counts the whole stream: two tensors that fit alone do not fit together.
        let a = Tensor::zeros([64], (Kind::Float, Device::Cpu));
        let mut asm = WeightAssembler::with_limit(300);
        for c in chunks("a", &a, 100).unwrap() {
            asm.push(c).unwrap();
        }
        let e = chunks("b", &a, 100)
            .unwrap()
            .into_iter()
            .try_for_each(|c| asm.push(c));
        assert!(e.unwrap_err().to_string().contains("tensor `b`"));
        // A chunk longer than its tensor is refused before it is copied.
        let mut big = chunks("c", &Tensor::zeros([2], (Kind::Float, Device::Cpu)), 100).unwrap();
        big[0].data = vec![0; 1000];
        let e = WeightAssembler::with_limit(1 << 20).push(big.remove(0));
        assert!(e.unwrap_err().to_string().contains("1000 bytes"));
    }
}
