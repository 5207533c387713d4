use super::*;
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn tiny() -> GgufFile {
    GgufFile::open(&fixture("tiny.gguf")).unwrap()
}

#[test]
fn reads_every_metadata_type() {
    let f = tiny();
    assert_eq!(f.version, 3);
    assert_eq!(f.meta("t.u8"), Some(&MetaValue::U8(200)));
    assert_eq!(f.meta("t.i8"), Some(&MetaValue::I8(-100)));
    assert_eq!(f.meta("t.u16"), Some(&MetaValue::U16(60000)));
    assert_eq!(f.meta("t.i16"), Some(&MetaValue::I16(-30000)));
    assert_eq!(f.meta("t.u32"), Some(&MetaValue::U32(4_000_000_000)));
    assert_eq!(f.meta("t.i32"), Some(&MetaValue::I32(-2_000_000_000)));
    assert_eq!(f.meta("t.f32"), Some(&MetaValue::F32(1.5)));
    assert_eq!(f.meta("t.u64"), Some(&MetaValue::U64((1 << 40) + 3)));
    assert_eq!(f.meta("t.i64"), Some(&MetaValue::I64(-(1 << 40))));
    assert_eq!(f.meta("t.f64"), Some(&MetaValue::F64(3.25)));
    assert_eq!(f.meta("t.bool"), Some(&MetaValue::Bool(true)));
    assert_eq!(f.meta_str("t.str").unwrap(), "héllo");
    assert_eq!(
        f.meta("t.arr_i32"),
        Some(&MetaValue::Array(vec![
            MetaValue::I32(1),
            MetaValue::I32(-2),
            MetaValue::I32(3)
        ]))
    );
    assert_eq!(
        f.meta("t.arr_str"),
        Some(&MetaValue::Array(vec![
            MetaValue::String("a".into()),
            MetaValue::String("bc".into())
        ]))
    );
    assert_eq!(f.meta_str("general.architecture").unwrap(), "llama");
}

#[test]
fn dequantizes_every_type_like_ggml() {
    let f = tiny();
    let expected: std::collections::BTreeMap<String, Vec<f32>> =
        serde_json::from_str(&std::fs::read_to_string(fixture("tiny_expected.json")).unwrap()).unwrap();
    assert_eq!(expected.len(), 11);
    for (name, want) in &expected {
        let (got, dims) = f.dequantize(name).unwrap();
        assert_eq!(dims, vec![256, 2], "{name}");
        assert_eq!(got.len(), want.len(), "{name}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= 1e-6 * w.abs().max(1.0), "{name}[{i}]: {g} vs {w}");
        }
    }
}

#[test]
fn truncated_file_is_an_error_naming_the_tensor_or_offset() {
    let bytes = std::fs::read(fixture("tiny.gguf")).unwrap();
    // The writer pads after the last tensor, so cut well into it.
    for cut in [3, 10, 30, 200, bytes.len() / 2, bytes.len() - 64] {
        let err = GgufFile::parse(bytes[..cut].to_vec()).unwrap_err().to_string();
        assert!(err.contains("corrupt GGUF at byte"), "cut {cut}: {err}");
    }
    let err = GgufFile::parse(bytes[..bytes.len() - 64].to_vec())
        .unwrap_err()
        .to_string();
    assert!(err.contains("'q6_k'"), "{err}");
}

#[test]
fn forged_counts_do_not_allocate() {
    let mut bytes = std::fs::read(fixture("tiny.gguf")).unwrap();
    // metadata count lives at bytes 16..24
    bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    let err = GgufFile::parse(bytes.clone()).unwrap_err().to_string();
    assert!(err.contains("metadata count"), "{err}");
    // tensor count at 8..16
    let mut bytes = std::fs::read(fixture("tiny.gguf")).unwrap();
    bytes[8..16].copy_from_slice(&(1u64 << 60).to_le_bytes());
    let err = GgufFile::parse(bytes).unwrap_err().to_string();
    assert!(err.contains("tensor count"), "{err}");
    // first key's string length at 24..32
    let mut bytes = std::fs::read(fixture("tiny.gguf")).unwrap();
    bytes[24..32].copy_from_slice(&(1u64 << 50).to_le_bytes());
    let err = GgufFile::parse(bytes).unwrap_err().to_string();
    assert!(err.contains("length"), "{err}");
}

#[test]
fn random_corruption_never_panics() {
    let good = std::fs::read(fixture("tiny.gguf")).unwrap();
    let mut state = 0x9e3779b97f4a7c15u64;
    for _ in 0..2000 {
        let mut bytes = good.clone();
        for _ in 0..4 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let at = (state % 1200) as usize;
            bytes[at] = (state >> 32) as u8;
        }
        if let Ok(f) = GgufFile::parse(bytes) {
            for t in f.tensors.clone() {
                let _ = f.dequantize(&t.name);
            }
        }
    }
}

#[test]
fn bad_magic_and_version() {
    let mut bytes = std::fs::read(fixture("tiny.gguf")).unwrap();
    bytes[0] = b'X';
    assert!(GgufFile::parse(bytes).unwrap_err().to_string().contains("bad magic"));
    let mut bytes = std::fs::read(fixture("tiny.gguf")).unwrap();
    bytes[4..8].copy_from_slice(&9u32.to_le_bytes());
    assert!(GgufFile::parse(bytes).unwrap_err().to_string().contains("version 9"));
}

/// A GGUF file of u64 metadata and f32 tensors `(name, dims, offset)`, its data section `data`
/// (aligned to 32 bytes after the header, unless `pad` is false).
fn forged(meta: &[(&str, u64)], tensors: &[(&str, &[u64], u64)], data: &[u8], pad: bool) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    let string = |b: &mut Vec<u8>, s: &str| {
        b.extend((s.len() as u64).to_le_bytes());
        b.extend(s.as_bytes());
    };
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((meta.len() as u64).to_le_bytes());
    for (key, value) in meta {
        string(&mut b, key);
        b.extend(10u32.to_le_bytes());
        b.extend(value.to_le_bytes());
    }
    for (name, dims, offset) in tensors {
        string(&mut b, name);
        b.extend((dims.len() as u32).to_le_bytes());
        for d in *dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(0u32.to_le_bytes());
        b.extend(offset.to_le_bytes());
    }
    if pad {
        b.resize(b.len().div_ceil(32) * 32, 0);
    }
    b.extend(data);
    b
}

#[test]
fn zero_sized_tensors_with_the_data_section_past_the_end_are_an_error() {
    // A 57-byte file: one empty tensor, no padding after the header.
    let bytes = forged(&[], &[("t", &[0], 0)], &[], false);
    assert_eq!(bytes.len(), 57);
    let err = GgufFile::parse(bytes).unwrap_err().to_string();
    assert!(err.contains("past the end of the file"), "{err}");
    // The same tensor with its section in place reads as empty.
    let f = GgufFile::parse(forged(&[], &[("t", &[0], 0)], &[], true)).unwrap();
    assert_eq!(f.dequantize("t").unwrap().0, Vec::<f32>::new());
}

#[test]
fn duplicate_keys_and_tensors_are_errors() {
    let err = GgufFile::parse(forged(&[("a", 1), ("a", 2)], &[], &[], true))
        .unwrap_err()
        .to_string();
    assert!(err.contains("metadata key 'a' appears twice"), "{err}");
    let data = [0u8; 64];
    let err = GgufFile::parse(forged(&[], &[("w", &[4], 0), ("w", &[4], 32)], &data, true))
        .unwrap_err()
        .to_string();
    assert!(err.contains("tensor 'w' appears twice"), "{err}");
}
