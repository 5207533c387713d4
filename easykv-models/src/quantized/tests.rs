use half::f16;
use rand::{Rng, SeedableRng};

use super::*;

const TYPES: [GgmlType; 8] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
];

/// Where each type keeps its f16 scales (random bytes there could be NaN or infinite).
fn f16_fields(ty: GgmlType) -> &'static [usize] {
    match ty {
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
        GgmlType::Q6K => &[208],
        _ => &[0],
    }
}

/// `blocks` random blocks of `ty` with finite scales.
fn random_blocks(ty: GgmlType, blocks: usize, rng: &mut impl Rng) -> Vec<u8> {
    let mut bytes: Vec<u8> = (0..blocks * ty.block_bytes()).map(|_| rng.random()).collect();
    for b in bytes.chunks_exact_mut(ty.block_bytes()) {
        for &at in f16_fields(ty) {
            let v = f16::from_f32(rng.random_range(-0.05f32..0.05));
            b[at..at + 2].copy_from_slice(&v.to_le_bytes());
        }
    }
    bytes
}

fn random_row(n: usize, rng: &mut impl Rng) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect()
}

/// The quantized activations as the f32 values they stand for.
fn widen(x: &[ActBlock]) -> Vec<f32> {
    x.iter().flat_map(|a| a.q.map(|q| a.d * q as f32)).collect()
}

/// The fast f16 widening equals `half`'s for every bit pattern.
#[test]
fn f16_widening_is_exact() {
    for h in 0..=u16::MAX {
        let want = f16::from_bits(h).to_f32();
        let got = chunks::f16_at(&h.to_le_bytes(), 0);
        assert!(
            got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
            "{h:#06x}: {got} vs {want}"
        );
    }
}

/// The quantizer's rounding equals `f32::round` for every value it meets: halves, values
/// near them and across the 16-bit range, NaN (0 once converted) included.
#[test]
fn rounding_equals_the_library_round() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut values: Vec<f32> = (-70000..70000).map(|i| i as f32 * 0.5).collect();
    values.extend((-70000..70000).flat_map(|i| {
        let h = i as f32 * 0.5;
        [
            f32::from_bits(h.to_bits() + 1),
            f32::from_bits(h.to_bits().saturating_sub(1)),
        ]
    }));
    values.extend((0..100_000).map(|_| rng.random_range(-40000.0f32..40000.0)));
    for v in values {
        // Equal as numbers (a negative zero becomes the same integer 0).
        assert_eq!(round(v), v.round(), "{v}");
    }
    assert_eq!(round(f32::NAN) as i16, f32::NAN.round() as i16);
}

fn close(got: f32, want: f32, scale: f32) -> bool {
    (got - want).abs() <= 1e-4 * scale.max(1.0)
}

/// Both scalar products equal the dequantized weights times the activations, for every type
/// and 1 to 9 blocks per row: with 8-bit activations exactly what they stand for, with f32
/// activations (the same values) up to summation order.
#[test]
fn scalar_products_equal_the_dequantized_weights_products() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for ty in TYPES {
        for blocks in [1, 2, 3, 9] {
            let n = blocks * ty.block_len();
            let w = random_blocks(ty, blocks, &mut rng);
            let x = quantize_row(&random_row(n, &mut rng));
            let xf = widen(&x);
            let dense = crate::gguf::dequantize(ty, &w, n).unwrap();
            let want: f32 = dense.iter().zip(&xf).map(|(a, b)| a * b).sum();
            let scale: f32 = dense.iter().zip(&xf).map(|(a, b)| (a * b).abs()).sum();
            let got = scalar::dot(ty, &w, &x);
            assert!(close(got, want, scale), "{ty:?} × {blocks}: {got} vs {want}");
            let got = scalar::float_dot(ty, &w, &FloatRow::new(&xf));
            assert!(close(got, want, scale), "{ty:?} × {blocks}, f32: {got} vs {want}");
        }
    }
}

/// Each SIMD kernel against its scalar twin: every type, odd block counts, many random rows.
#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_products_equal_the_scalar_ones() {
    let Some(simd) = pulp::x86::V3::try_new() else {
        eprintln!("no AVX2 on this CPU: the SIMD kernels are not tested here");
        return;
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for ty in TYPES {
        for blocks in [1, 2, 5, 7] {
            for _ in 0..20 {
                let n = blocks * ty.block_len();
                let w = random_blocks(ty, blocks, &mut rng);
                let x = quantize_row(&random_row(n, &mut rng));
                let dense = crate::gguf::dequantize(ty, &w, n).unwrap();
                let scale: f32 = dense.iter().zip(widen(&x)).map(|(a, b)| (a * b).abs()).sum();
                let (got, want) = (avx2::dot(simd, ty, &w, &x), scalar::dot(ty, &w, &x));
                assert!(close(got, want, scale), "{ty:?} × {blocks}: {got} vs {want}");
                // The f32-activation kernel on the same weights.
                let xf = widen(&x);
                let row = FloatRow::new(&xf);
                let got = simd.vectorize(|| avx2::float_dot(simd, ty, &w, &row));
                let want = scalar::float_dot(ty, &w, &row);
                assert!(close(got, want, scale), "{ty:?} × {blocks}, f32: {got} vs {want}");
            }
        }
    }
}

/// [`vnni::dots`] of every row of `m` with `rows` quantized to `Q` equals the scalar dots.
#[cfg(target_arch = "x86_64")]
fn check_vnni<Q: ActInt>(token: vnni::Vnni, m: &QuantMatrix, rows: &[Vec<f32>]) {
    let xs: Vec<Vec<ActBlock<Q>>> = rows.iter().map(|r| quantize_row::<Q>(r)).collect();
    let mut got = vec![0f32; m.rows() * xs.len()];
    vnni::dots(token, (0..m.rows()).map(|r| (m, r)), &xs, &mut got);
    for r in 0..m.rows() {
        let dense = crate::gguf::dequantize(m.ty(), &m.row(r), m.cols()).unwrap();
        for (j, (x, xf)) in xs.iter().zip(rows).enumerate() {
            let want = scalar::dot(m.ty(), &m.row(r), x);
            let scale: f32 = dense.iter().zip(xf).map(|(a, b)| (a * b).abs()).sum();
            let got = got[r * xs.len() + j];
            let (ty, q) = (m.ty(), std::any::type_name::<Q>());
            assert!(
                close(got, want, scale),
                "{ty:?}, {q}, row {r}, activation row {j}: {got} vs {want}"
            );
        }
    }
}

/// The VNNI kernels against the scalar ones: every type they handle, odd block counts (so
/// rows of one activation row end inside an unrolled group), one to five activation rows.
#[cfg(target_arch = "x86_64")]
#[test]
fn vnni_products_equal_the_scalar_ones() {
    let Some(token) = vnni::Vnni::detect() else {
        eprintln!("no AVX-VNNI on this CPU: the VNNI kernels are not tested here");
        return;
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(13);
    for ty in TYPES.into_iter().filter(|&t| vnni::handles(t)) {
        for blocks in [1, 2, 3, 5, 7, 9] {
            for acts in 1..=5 {
                let n = blocks * ty.block_len();
                let rows = 3;
                let w = random_blocks(ty, rows * blocks, &mut rng);
                let m = QuantMatrix::new(ty, rows, n, &w).unwrap();
                let rows_f32: Vec<Vec<f32>> = (0..acts).map(|_| random_row(n, &mut rng)).collect();
                check_vnni::<i8>(token, &m, &rows_f32);
                check_vnni::<i16>(token, &m, &rows_f32);
            }
        }
    }
}

/// A product over stacked parts of different types and several activation rows equals the row
/// by row dots, with whichever kernel the CPU runs.
#[test]
fn stacked_products_equal_row_dots() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let cols = 512;
    let parts: Vec<QuantMatrix> = [(GgmlType::Q4K, 70), (GgmlType::Q6K, 3), (GgmlType::Q4_1, 130)]
        .into_iter()
        .map(|(ty, rows)| {
            let bytes = random_blocks(ty, rows * cols / ty.block_len(), &mut rng);
            QuantMatrix::new(ty, rows, cols, &bytes).unwrap()
        })
        .collect();
    let out: usize = parts.iter().map(QuantMatrix::rows).sum();
    for (rows, activations) in [
        (1, Activations::Int8),
        (3, Activations::Int8),
        (30, Activations::Int8),
        (1, Activations::Int16),
        (6, Activations::Int16),
        (1, Activations::F32),
        (5, Activations::F32),
    ] {
        let x = random_row(rows * cols, &mut rng);
        let y = product(&parts, &x, rows, Kernel::detect(), activations);
        assert_eq!(y.len(), rows * out);
        for (j, xr) in x.chunks(cols).enumerate() {
            let (a, f) = (quantize_row::<i8>(xr), FloatRow::new(xr));
            let wide = quantize_row::<i16>(xr);
            // 16-bit activations where the VNNI kernels take all three types; f32 otherwise.
            #[cfg(target_arch = "x86_64")]
            let wide_runs = vnni::Vnni::detect().is_some();
            #[cfg(not(target_arch = "x86_64"))]
            let wide_runs = false;
            let want: Vec<f32> = parts
                .iter()
                .flat_map(|p| {
                    (0..p.rows())
                        .map(|r| match activations {
                            Activations::Int8 => scalar::dot(p.ty(), &p.row(r), &a),
                            Activations::Int16 if wide_runs => scalar::dot(p.ty(), &p.row(r), &wide),
                            Activations::Int16 | Activations::F32 => scalar::float_dot(p.ty(), &p.row(r), &f),
                        })
                        .collect::<Vec<_>>()
                })
                .collect();
            for (o, w) in want.iter().enumerate() {
                let got = y[j * out + o];
                assert!(
                    (got - w).abs() <= 1e-3 * w.abs().max(1.0),
                    "row {j}, output {o}: {got} vs {w}"
                );
            }
        }
    }
}

/// This CPU's AVX-512 VNNI token; `None`, saying that the test is skipped, where it lacks it.
#[cfg(target_arch = "x86_64")]
fn avx512_vnni() -> Option<vnni::gemm::Avx512Vnni> {
    let token = vnni::gemm::Avx512Vnni::detect();
    if token.is_none() {
        eprintln!("skipped: this CPU lacks AVX-512 VNNI");
    }
    token
}

/// The AVX-512 product of many rows equals the scalar dots with 16-bit activations, for every
/// type, stacked parts whose row counts are not whole tiles, and activation row counts that are
/// not whole registers.
#[cfg(target_arch = "x86_64")]
#[test]
fn many_row_products_equal_the_scalar_ones() {
    if avx512_vnni().is_none() {
        return;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for ty in TYPES {
        let cols = 2 * ty.block_len().max(BLOCK) + if ty.block_len() == BLOCK { BLOCK } else { 0 };
        let parts: Vec<QuantMatrix> = [13, 8, 1]
            .into_iter()
            .map(|rows| {
                QuantMatrix::new(
                    ty,
                    rows,
                    cols,
                    &random_blocks(ty, rows * cols / ty.block_len(), &mut rng),
                )
                .unwrap()
            })
            .collect();
        for rows in [1, 16, 17, 40] {
            let x = random_row(rows * cols, &mut rng);
            check_many::<i8>(&parts, &x, rows);
            check_many::<i16>(&parts, &x, rows);
        }
    }
}

/// The AVX-512 quantizer equals the scalar one bit for bit: random rows, halves, zeros, a
/// block with one huge value, and blocks with NaN or infinity (the scalar path).
#[cfg(target_arch = "x86_64")]
#[test]
fn avx512_quantizer_equals_the_scalar_one() {
    let Some(token) = avx512_vnni() else {
        return;
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(13);
    let mut rows: Vec<Vec<f32>> = (0..50).map(|_| random_row(8 * BLOCK, &mut rng)).collect();
    rows.push((0..BLOCK).map(|i| i as f32 * 0.5 - 8.0).collect());
    rows.push(vec![0.0; BLOCK]);
    let mut huge = vec![1e-3; BLOCK];
    huge[5] = -3e4;
    rows.push(huge);
    let mut odd = random_row(2 * BLOCK, &mut rng);
    odd[3] = f32::NAN;
    odd[40] = f32::INFINITY;
    rows.push(odd);
    // Compared as printed: a block of an infinity has a NaN sum, which equals nothing.
    for x in &rows {
        let (a, b) = (vnni::gemm::quantize_row::<i8>(token, x), quantize_row::<i8>(x));
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
        let (a, b) = (vnni::gemm::quantize_row::<i16>(token, x), quantize_row::<i16>(x));
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
    }
}

/// The AVX-512 K-quant dots equal their scalar twin over the same 256-value activation
/// blocks, and stay within 16-bit rounding of the dense product.
#[cfg(target_arch = "x86_64")]
#[test]
fn kquant_dots_equal_the_scalar_ones() {
    let Some(token) = avx512_vnni() else {
        return;
    };
    use vnni::kquants;
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    for ty in [GgmlType::Q4K, GgmlType::Q6K] {
        for blocks in [1, 2, 5] {
            let (rows, cols) = (3, blocks * 256);
            let m = QuantMatrix::new(ty, rows, cols, &random_blocks(ty, rows * blocks, &mut rng)).unwrap();
            let mut x = random_row(cols, &mut rng);
            x[7] = 40.0; // one large activation: the others keep fewer bits
            let a = kquants::quantize_row(&x);
            for r in 0..rows {
                let (got, want) = (kquants::dot(token, &m, r, &a), kquants::scalar_dot(ty, &m.row(r), &a));
                assert!(
                    (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                    "{ty:?} × {blocks}, row {r}: {got} vs {want}"
                );
                let dense = crate::gguf::dequantize(ty, &m.row(r), cols).unwrap();
                let exact: f32 = dense.iter().zip(&x).map(|(w, x)| w * x).sum();
                let scale: f32 = dense.iter().zip(&x).map(|(w, x)| (w * x).abs()).sum();
                assert!(
                    (got - exact).abs() <= 1e-3 * scale.max(1.0),
                    "{ty:?}: {got} vs dense {exact}"
                );
            }
        }
    }
    // Through `product`: stacked Q4_K and Q6_K parts, one activation row of 16 bits.
    let cols = 512;
    let parts: Vec<QuantMatrix> = [(GgmlType::Q4K, 70), (GgmlType::Q6K, 9)]
        .into_iter()
        .map(|(ty, rows)| QuantMatrix::new(ty, rows, cols, &random_blocks(ty, rows * 2, &mut rng)).unwrap())
        .collect();
    let x = random_row(cols, &mut rng);
    let y = product(&parts, &x, 1, Kernel::detect(), Activations::Int16);
    let a = kquants::quantize_row(&x);
    let want: Vec<f32> = parts
        .iter()
        .flat_map(|p| {
            (0..p.rows())
                .map(|r| kquants::scalar_dot(p.ty(), &p.row(r), &a))
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(y.len(), want.len());
    for (o, (got, want)) in y.iter().zip(&want).enumerate() {
        assert!(
            (got - want).abs() <= 1e-4 * want.abs().max(1.0),
            "output {o}: {got} vs {want}"
        );
    }
}

#[cfg(target_arch = "x86_64")]
fn check_many<Q: ActInt>(parts: &[QuantMatrix], x: &[f32], rows: usize) {
    let (cols, out) = (parts[0].cols(), parts.iter().map(QuantMatrix::rows).sum::<usize>());
    let y = product_many::<Q>(parts, x, rows).unwrap();
    assert_eq!(y.len(), rows * out);
    for (j, xr) in x.chunks(cols).enumerate() {
        let a = quantize_row::<Q>(xr);
        let want = parts.iter().flat_map(|p| {
            (0..p.rows())
                .map(|r| scalar::dot(p.ty(), &p.row(r), &a))
                .collect::<Vec<_>>()
        });
        for (o, w) in want.enumerate() {
            let got = y[j * out + o];
            let ty = parts[0].ty();
            // Offsets (`b·Σx`) cancel most of the products (Q6_K: `u − 32`), so the f32
            // additions' order shows in the last few digits.
            assert!(
                (got - w).abs() <= 1e-3 * w.abs().max(1.0),
                "{ty:?}, {}-bit, row {j} of {rows}, output {o}: {got} vs {w}",
                if Q::WIDE { 16 } else { 8 }
            );
        }
    }
}

#[test]
fn matrices_refuse_bytes_that_are_not_whole_rows() {
    let ty = GgmlType::Q4_1;
    assert!(QuantMatrix::new(ty, 2, 64, &[0; 2 * 2 * 20]).is_some());
    assert!(QuantMatrix::new(ty, 2, 64, &[0; 2 * 2 * 20 - 1]).is_none());
    assert!(QuantMatrix::new(ty, 2, 48, &[0; 60]).is_none());
    assert!(QuantMatrix::new(GgmlType::F16, 2, 64, &[0; 256]).is_none());
    assert!(QuantMatrix::new(GgmlType::Q4K, 1, 128, &[0; 72]).is_none());
}

/// Not a test: `cargo test --release -p easykv-models --lib quantized::tests::speed -- --ignored --nocapture`.
#[test]
#[ignore]
fn speed() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    for (ty, rows, cols) in [
        (GgmlType::Q4_1, 576, 576),
        (GgmlType::Q4_1, 960, 576),
        (GgmlType::Q4_1, 1536, 576),
        (GgmlType::Q4_1, 16384, 576),
        // Larger than the caches: streamed from memory, as a model's weights are.
        (GgmlType::Q4_1, 163840, 576),
        (GgmlType::Q8_0, 8192, 576),
        (GgmlType::Q4K, 1536, 1536),
        (GgmlType::Q6K, 1536, 1536),
    ] {
        let bytes = random_blocks(ty, rows * cols / ty.block_len(), &mut rng);
        let m = vec![QuantMatrix::new(ty, rows, cols, &bytes).unwrap()];
        for (n_rows, act) in [
            (1, Activations::Int8),
            (1, Activations::Int16),
            (1, Activations::F32),
            (4, Activations::Int8),
            (16, Activations::Int8),
        ] {
            let x = random_row(cols * n_rows, &mut rng);
            // The fastest of five rounds: the machine is shared, and a round another process
            // interrupted says nothing about the kernel.
            let n = 40;
            let s = (0..5)
                .map(|_| {
                    let t = std::time::Instant::now();
                    for _ in 0..n {
                        std::hint::black_box(product(&m, &x, n_rows, Kernel::detect(), act));
                    }
                    t.elapsed().as_secs_f64() / n as f64
                })
                .fold(f64::INFINITY, f64::min);
            println!(
                "{ty:?} {rows}x{cols} × {n_rows} rows {act:?}: {:.1} µs, {:.2} GB/s of weights, {:.2} ns per block and row",
                s * 1e6,
                bytes.len() as f64 / s / 1e9,
                s * 1e9 / (rows * cols / 32 * n_rows) as f64
            );
        }
    }
}

/// `y` (`product`'s `[rows, Σ rows of plain]`) against `dot(matrix, row, activation row)` for
/// every row of `plain` (the interleaved matrices' originals), up to the order of f32 sums.
#[cfg(target_arch = "x86_64")]
fn assert_products(
    y: &[f32],
    plain: &[QuantMatrix],
    x: &[f32],
    dot: impl Fn(&QuantMatrix, usize, &[f32]) -> f32,
    what: &str,
) {
    let (cols, out) = (plain[0].cols(), plain.iter().map(QuantMatrix::rows).sum::<usize>());
    for (j, xr) in x.chunks(cols).enumerate() {
        let want = plain.iter().flat_map(|m| (0..m.rows()).map(move |r| (m, r)));
        for (o, (m, r)) in want.enumerate() {
            let (got, w) = (y[j * out + o], dot(m, r, xr));
            assert!(
                (got - w).abs() <= 1e-3 * w.abs().max(1.0),
                "{what}, row {j}, output {o}: {got} vs {w}"
            );
        }
    }
}

/// Interleaved matrices give back their originals' rows, whole and as f32.
#[cfg(target_arch = "x86_64")]
fn assert_same_rows(parts: &[QuantMatrix], plain: &[QuantMatrix]) {
    for (p, m) in parts.iter().zip(plain) {
        assert!(p.is_interleaved());
        for r in 0..m.rows() {
            assert_eq!(p.row(r), m.row(r), "{:?} row {r}", m.ty());
        }
        assert_eq!(p.dequantize(), m.dequantize());
        assert_eq!(p.dequantize_rows(5..13), m.dequantize_rows(5..13));
    }
}

/// Matrices stored sixteen rows to a group give back their rows as they were, and the decode
/// kernel's products equal the scalar dots of those rows: the three types it takes, stacked
/// parts, an odd number of blocks per row and several activation rows, 8- and 16-bit. The
/// prefill kernel and the f32 widening read the same rows through the copy.
#[cfg(target_arch = "x86_64")]
#[test]
fn interleaved_products_equal_the_scalar_ones() {
    if avx512_vnni().is_none() {
        return;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(19);
    for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
        for cols in [3 * BLOCK, 576] {
            let plain: Vec<QuantMatrix> = [32, 16, 48]
                .into_iter()
                .map(|rows| {
                    QuantMatrix::new(ty, rows, cols, &random_blocks(ty, rows * cols / BLOCK, &mut rng)).unwrap()
                })
                .collect();
            let parts: Vec<QuantMatrix> = plain
                .iter()
                .map(|m| m.interleaved(Activations::Int16).unwrap())
                .collect();
            assert_same_rows(&parts, &plain);
            // Not a whole number of groups: kept row by row.
            let eight = QuantMatrix::new(ty, 8, cols, &random_blocks(ty, 8 * cols / BLOCK, &mut rng)).unwrap();
            assert!(eight.interleaved(Activations::Int8).is_none());
            for rows in [1, 3] {
                let x = random_row(rows * cols, &mut rng);
                let what = format!("{ty:?}, {cols} columns, {rows} rows");
                let y = product(&parts, &x, rows, Kernel::detect(), Activations::Int8);
                let dot = |m: &QuantMatrix, r: usize, xr: &[f32]| scalar::dot(ty, &m.row(r), &quantize_row::<i8>(xr));
                assert_products(&y, &plain, &x, dot, &format!("{what}, 8-bit"));
                let y = product(&parts, &x, rows, Kernel::detect(), Activations::Int16);
                let dot = |m: &QuantMatrix, r: usize, xr: &[f32]| scalar::dot(ty, &m.row(r), &quantize_row::<i16>(xr));
                assert_products(&y, &plain, &x, dot, &format!("{what}, 16-bit"));
            }
            let x = random_row(40 * cols, &mut rng);
            assert_eq!(product_many::<i16>(&parts, &x, 40), product_many::<i16>(&plain, &x, 40));
        }
    }
}

/// Q4_K and Q6_K matrices stored sixteen rows to a group give back their rows as they were,
/// and their decode dots — alone and stacked with each other, for `q16` and `q8` alike (the
/// K-quant groups take 16-bit activations per 256 either way) — equal the scalar K-quant dots
/// of those rows.
#[cfg(target_arch = "x86_64")]
#[test]
fn interleaved_kquant_products_equal_the_scalar_ones() {
    if avx512_vnni().is_none() {
        return;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(23);
    for cols in [256, 768] {
        let plain: Vec<QuantMatrix> = [(GgmlType::Q4K, 32), (GgmlType::Q6K, 16), (GgmlType::Q4K, 16)]
            .into_iter()
            .map(|(ty, rows)| {
                QuantMatrix::new(ty, rows, cols, &random_blocks(ty, rows * cols / 256, &mut rng)).unwrap()
            })
            .collect();
        assert!(plain[0].interleaved(Activations::Int8).is_some());
        assert!(plain[0].interleaved(Activations::F32).is_none());
        let parts: Vec<QuantMatrix> = plain
            .iter()
            .map(|m| m.interleaved(Activations::Int16).unwrap())
            .collect();
        assert_same_rows(&parts, &plain);
        for rows in [1, 2] {
            let x = random_row(rows * cols, &mut rng);
            let dot = |m: &QuantMatrix, r: usize, xr: &[f32]| {
                vnni::kquants::scalar_dot(m.ty(), &m.row(r), &vnni::kquants::quantize_row(xr))
            };
            // Alone and stacked.
            for (range, activations) in [0..1, 1..2, 0..3]
                .into_iter()
                .flat_map(|r| [(r.clone(), Activations::Int16), (r, Activations::Int8)])
            {
                let y = product(&parts[range.clone()], &x, rows, Kernel::detect(), activations);
                assert_products(
                    &y,
                    &plain[range.clone()],
                    &x,
                    dot,
                    &format!("{range:?}, {cols} columns, {rows} rows, {activations:?}"),
                );
            }
        }
        let x = random_row(40 * cols, &mut rng);
        assert_eq!(product_many::<i16>(&parts, &x, 40), product_many::<i16>(&plain, &x, 40));
        assert_eq!(product_many::<i8>(&parts, &x, 40), product_many::<i8>(&plain, &x, 40));
    }
}
