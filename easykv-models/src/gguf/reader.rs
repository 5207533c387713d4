//! GGUF v2/v3 container: header, metadata, tensor infos and the aligned data section.
//!
//! Every count, length and offset read from the file is checked against the bytes that are
//! actually there (the header's against the bytes read, the tensors' against the file's
//! length) before anything is allocated, so a forged or truncated file is an error naming the
//! offset or tensor, never a panic or a huge allocation.

use std::collections::BTreeMap;
use std::path::Path;

use super::quant::GgmlType;
use crate::error::{Error, Result};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Tensors of more dimensions than this do not exist in GGUF (ggml's GGML_MAX_DIMS).
const MAX_DIMS: u32 = 4;

/// One metadata value. Arrays keep their element type implicitly through the variants.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// The value as an unsigned integer, if it is any non-negative integer type.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is any numeric type.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v.into()),
            MetaValue::F64(v) => Some(v),
            MetaValue::I8(v) => Some(v.into()),
            MetaValue::I16(v) => Some(v.into()),
            MetaValue::I32(v) => Some(v.into()),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where a tensor lives in the data section and how it is encoded.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the fastest-varying (row length).
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
    /// Number of bytes the encoded tensor occupies.
    pub n_bytes: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A parsed GGUF file: its header in memory, its tensors' bytes where [`Data`] says.
#[derive(Debug)]
pub struct GgufFile {
    pub version: u32,
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: Vec<TensorInfo>,
    data_start: usize,
    data: Data,
}

/// Where a parsed file's tensor bytes come from.
#[derive(Debug)]
enum Data {
    /// The whole file in memory (parsed from bytes): matrices kept in their blocks point into
    /// it instead of copying it.
    Memory(std::sync::Arc<Vec<u8>>),
    /// On disk, each tensor read when asked for: a model's matrices are read one at a time,
    /// so a quantized model's peak memory is its matrices (a matrix stored reordered for the
    /// decode kernels replaces its read copy at once), not the whole file and the copies. The
    /// file's length as its header was checked against.
    #[cfg(unix)]
    Disk(std::fs::File, u64),
}

/// The first part of a file read for its header (doubled while the header does not fit: it
/// holds the tokenizer's vocabulary, a few MiB).
#[cfg(unix)]
const HEADER_FIRST_READ: u64 = 1 << 20;

/// What [`GgufFile::parse_header`] reads.
struct Header {
    version: u32,
    metadata: BTreeMap<String, MetaValue>,
    tensors: Vec<TensorInfo>,
    data_start: usize,
}

/// A tensor's encoded bytes, as [`GgufFile::tensor_blocks`] hands them over.
pub enum TensorBlocks {
    /// A range of the file's bytes, shared.
    Shared(std::sync::Arc<Vec<u8>>, std::ops::Range<usize>),
    /// Read for this tensor.
    Read(Vec<u8>),
}

impl GgufFile {
    /// Opens and parses a GGUF file: its header is read and checked against the file's length;
    /// tensors are read when asked for.
    pub fn open(path: &Path) -> Result<Self> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::FileExt;
            let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
            // The header's length is not known before it is parsed: a first part of the file,
            // doubled until the header fits in it (or it is the whole file, whose error counts).
            let mut want = len.min(HEADER_FIRST_READ);
            loop {
                let mut head = vec![0u8; want as usize];
                file.read_exact_at(&mut head, 0).map_err(|e| Error::io(path, e))?;
                match Self::parse_header(&head, len) {
                    Ok(header) => return Ok(Self::with_data(header, Data::Disk(file, len))),
                    Err(_) if want < len => want = want.saturating_mul(2).min(len),
                    Err(e) => return Err(e),
                }
            }
        }
        #[cfg(not(unix))]
        Self::parse(std::fs::read(path).map_err(|e| Error::io(path, e))?)
    }

    /// Parses GGUF bytes (the whole file).
    pub fn parse(bytes: Vec<u8>) -> Result<Self> {
        let header = Self::parse_header(&bytes, bytes.len() as u64)?;
        Ok(Self::with_data(header, Data::Memory(std::sync::Arc::new(bytes))))
    }

    fn with_data(h: Header, data: Data) -> Self {
        Self {
            version: h.version,
            metadata: h.metadata,
            tensors: h.tensors,
            data_start: h.data_start,
            data,
        }
    }

    /// The header at the start of `bytes` (all of the file, or its first part) of a file of
    /// `len` bytes: every tensor is checked to lie inside those `len`.
    fn parse_header(bytes: &[u8], len: u64) -> Result<Header> {
        let mut cur = Cursor { bytes, pos: 0 };
        let magic = cur.take(4, "magic")?;
        if magic != MAGIC {
            return Err(Error::gguf(0, "not a GGUF file (bad magic)"));
        }
        let version = cur.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(Error::gguf(
                4,
                format!("unsupported GGUF version {version} (need 2 or 3)"),
            ));
        }
        let n_tensors = cur.u64("tensor count")?;
        let n_kv = cur.u64("metadata count")?;
        // Each metadata entry needs at least a key length (8), a type (4) and one byte of value;
        // each tensor info at least 8 + 4 + 8 + 4 + 8 bytes. Reject forged counts before looping.
        cur.ensure_room(n_kv, 13, "metadata count")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let at = cur.pos;
            let key = cur.string("metadata key")?;
            let ty = cur.u32("metadata type")?;
            let value = cur.value(ty, &key, 0)?;
            if metadata.contains_key(&key) {
                return Err(Error::gguf(at, format!("metadata key '{key}' appears twice")));
            }
            metadata.insert(key, value);
        }
        cur.ensure_room(n_tensors, 32, "tensor count")?;
        let mut infos = Vec::new();
        let mut names = std::collections::HashSet::new();
        for _ in 0..n_tensors {
            let at = cur.pos;
            let name = cur.string("tensor name")?;
            if !names.insert(name.clone()) {
                return Err(Error::gguf(at, format!("tensor '{name}' appears twice")));
            }
            let n_dims = cur.u32("tensor dims")?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(Error::gguf(at, format!("tensor '{name}' has {n_dims} dimensions")));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(cur.u64("tensor dim")?);
            }
            let type_id = cur.u32("tensor type")?;
            let ggml_type = GgmlType::from_id(type_id)
                .ok_or_else(|| Error::gguf(at, format!("tensor '{name}' has unsupported ggml type {type_id}")))?;
            let offset = cur.u64("tensor offset")?;
            let n_elements = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| Error::gguf(at, format!("tensor '{name}' element count overflows")))?;
            if dims[0] % ggml_type.block_len() as u64 != 0 {
                return Err(Error::gguf(
                    at,
                    format!(
                        "tensor '{name}' row length {} is not a multiple of the {ggml_type:?} block",
                        dims[0]
                    ),
                ));
            }
            let n_bytes = (n_elements / ggml_type.block_len() as u64)
                .checked_mul(ggml_type.block_bytes() as u64)
                .ok_or_else(|| Error::gguf(at, format!("tensor '{name}' byte size overflows")))?;
            infos.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
                n_bytes,
            });
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => return Err(Error::gguf(cur.pos, "general.alignment is not a power of two")),
            },
        };
        let data_start = (cur.pos as u64).div_ceil(alignment) * alignment;
        // Tensors of zero bytes still need their data section to start inside the file.
        if !infos.is_empty() && data_start > len {
            return Err(Error::gguf(
                cur.pos,
                format!("the data section (aligned to {alignment}) starts past the end of the file"),
            ));
        }
        let data_len = len.saturating_sub(data_start);
        for t in &infos {
            if t.offset % alignment != 0 {
                return Err(Error::gguf(
                    data_start,
                    format!("tensor '{}' offset {} is not aligned", t.name, t.offset),
                ));
            }
            match t.offset.checked_add(t.n_bytes) {
                Some(end) if end <= data_len => {}
                _ => {
                    return Err(Error::gguf(
                        data_start.saturating_add(t.offset),
                        format!(
                            "tensor '{}' ({} bytes at offset {}) runs past the end of the file",
                            t.name, t.n_bytes, t.offset
                        ),
                    ))
                }
            }
        }
        Ok(Header {
            version,
            metadata,
            tensors: infos,
            data_start: data_start as usize,
        })
    }

    pub fn meta(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    /// A required integer metadata value.
    pub fn meta_u64(&self, key: &str) -> Result<u64> {
        self.meta(key)
            .and_then(MetaValue::as_u64)
            .ok_or_else(|| Error::MissingMetadata(key.to_string()))
    }

    /// A required float metadata value.
    pub fn meta_f64(&self, key: &str) -> Result<f64> {
        self.meta(key)
            .and_then(MetaValue::as_f64)
            .ok_or_else(|| Error::MissingMetadata(key.to_string()))
    }

    /// A required string metadata value.
    pub fn meta_str(&self, key: &str) -> Result<&str> {
        self.meta(key)
            .and_then(MetaValue::as_str)
            .ok_or_else(|| Error::MissingMetadata(key.to_string()))
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw encoded bytes of a tensor (bounds were checked at parse time; an info from
    /// elsewhere that points outside the file gets no bytes).
    pub fn tensor_bytes(&self, info: &TensorInfo) -> Result<std::borrow::Cow<'_, [u8]>> {
        Ok(match &self.data {
            Data::Memory(bytes) => std::borrow::Cow::Borrowed(&bytes[self.byte_range(info, bytes.len() as u64)]),
            #[cfg(unix)]
            Data::Disk(file, len) => std::borrow::Cow::Owned(self.read_tensor(file, *len, info)?),
        })
    }

    /// A tensor's encoded bytes: a shared range of the file's bytes in memory, or read from
    /// disk for it.
    pub fn tensor_blocks(&self, info: &TensorInfo) -> Result<TensorBlocks> {
        Ok(match &self.data {
            Data::Memory(bytes) => TensorBlocks::Shared(bytes.clone(), self.byte_range(info, bytes.len() as u64)),
            #[cfg(unix)]
            Data::Disk(file, len) => TensorBlocks::Read(self.read_tensor(file, *len, info)?),
        })
    }

    /// Where a tensor's bytes lie in a file of `len` bytes; empty where an info from elsewhere
    /// points outside it.
    fn byte_range(&self, info: &TensorInfo, len: u64) -> std::ops::Range<usize> {
        let start = self.data_start.saturating_add(info.offset as usize);
        let end = start.saturating_add(info.n_bytes as usize);
        match end as u64 <= len {
            true => start..end,
            false => 0..0,
        }
    }

    /// A tensor's bytes read from `file` (`len` bytes when its header was checked; a file cut
    /// shorter since is an error of the read).
    #[cfg(unix)]
    fn read_tensor(&self, file: &std::fs::File, len: u64, info: &TensorInfo) -> Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let range = self.byte_range(info, len);
        let mut v = vec![0u8; range.len()];
        file.read_exact_at(&mut v, range.start as u64).map_err(|e| {
            Error::gguf(
                range.start as u64,
                format!("tensor '{}' could not be read: {e}", info.name),
            )
        })?;
        Ok(v)
    }

    /// Dequantizes a tensor to f32, row-major with `dims[0]` fastest.
    pub fn dequantize(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let info = self
            .tensor_info(name)
            .ok_or_else(|| Error::MissingTensor(name.to_string()))?;
        let data = super::quant::dequantize(info.ggml_type, &self.tensor_bytes(info)?, info.n_elements() as usize)
            .map_err(|msg| Error::gguf(self.data_start as u64 + info.offset, format!("tensor '{name}': {msg}")))?;
        Ok((data, info.dims.iter().map(|&d| d as usize).collect()))
    }
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

/// Nesting deeper than this is not something a real writer produces.
const MAX_ARRAY_NESTING: usize = 4;

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(Error::gguf(
                self.pos as u64,
                format!(
                    "truncated file while reading {what} ({n} bytes needed, {} left)",
                    self.remaining()
                ),
            ));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn ensure_room(&self, count: u64, min_each: u64, what: &str) -> Result<()> {
        if count.saturating_mul(min_each) > self.remaining() as u64 {
            return Err(Error::gguf(
                self.pos as u64,
                format!("{what} {count} is larger than the file can hold"),
            ));
        }
        Ok(())
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let at = self.pos;
        let len = self.u64(what)?;
        if len > self.remaining() as u64 {
            return Err(Error::gguf(
                at as u64,
                format!("{what} length {len} runs past the end of the file"),
            ));
        }
        let raw = self.take(len as usize, what)?;
        String::from_utf8(raw.to_vec()).map_err(|_| Error::gguf(at as u64, format!("{what} is not valid UTF-8")))
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<MetaValue> {
        let at = self.pos as u64;
        Ok(match ty {
            0 => MetaValue::U8(u8::from_le_bytes(self.array(key)?)),
            1 => MetaValue::I8(i8::from_le_bytes(self.array(key)?)),
            2 => MetaValue::U16(u16::from_le_bytes(self.array(key)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array(key)?)),
            4 => MetaValue::U32(self.u32(key)?),
            5 => MetaValue::I32(i32::from_le_bytes(self.array(key)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array(key)?)),
            7 => match self.array::<1>(key)?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => return Err(Error::gguf(at, format!("metadata '{key}' has bool byte {b}"))),
            },
            8 => MetaValue::String(self.string(key)?),
            9 => {
                if depth >= MAX_ARRAY_NESTING {
                    return Err(Error::gguf(at, format!("metadata '{key}' nests arrays too deeply")));
                }
                let elem_ty = self.u32(key)?;
                let count = self.u64(key)?;
                let min_size = match elem_ty {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8..=12 => 8,
                    _ => {
                        return Err(Error::gguf(
                            at,
                            format!("metadata '{key}' has unknown array element type {elem_ty}"),
                        ))
                    }
                };
                self.ensure_room(count, min_size, &format!("metadata '{key}' array length"))?;
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(elem_ty, key, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64(key)?),
            11 => MetaValue::I64(i64::from_le_bytes(self.array(key)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array(key)?)),
            _ => return Err(Error::gguf(at, format!("metadata '{key}' has unknown value type {ty}"))),
        })
    }
}
