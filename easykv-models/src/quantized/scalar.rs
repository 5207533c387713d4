//! The products in plain Rust: every block type, any CPU; what the SIMD kernels are tested
//! against.

use super::chunks::{f16_at, for_each_chunk};
use super::{ActBlock, ActInt, FloatRow, BLOCK};
use crate::gguf::GgmlType;

/// `Σ w·x` of one row of `ty` blocks and a quantized activation row.
pub fn dot<Q: ActInt>(ty: GgmlType, row: &[u8], x: &[ActBlock<Q>]) -> f32 {
    if ty == GgmlType::Q8_0 {
        return row
            .chunks_exact(ty.block_bytes())
            .zip(x)
            .map(|(b, a)| {
                let s: i32 = b[2..2 + BLOCK]
                    .iter()
                    .zip(&a.q)
                    .map(|(&w, &q)| w as i8 as i32 * q.into())
                    .sum();
                f16_at(b, 0) * a.d * s as f32
            })
            .sum();
    }
    let mut acc = 0f32;
    for_each_chunk(ty, row, |c, chunk| {
        let Some(a) = x.get(c) else {
            return;
        };
        let half = |h: usize| -> i32 {
            let r = h * 16..h * 16 + 16;
            chunk.u[r.clone()]
                .iter()
                .zip(&a.q[r])
                .map(|(&u, &q)| u as i32 * q.into())
                .sum()
        };
        acc += a.d
            * (chunk.a[0] * half(0) as f32
                + chunk.a[1] * half(1) as f32
                + chunk.b[0] * a.sums[0] as f32
                + chunk.b[1] * a.sums[1] as f32);
    });
    acc
}

/// `Σ w·x` of one row of `ty` blocks and a row of f32 activations.
pub fn float_dot(ty: GgmlType, row: &[u8], x: &FloatRow) -> f32 {
    if ty == GgmlType::Q8_0 {
        return row
            .chunks_exact(ty.block_bytes())
            .zip(x.x.chunks_exact(BLOCK))
            .map(|(b, x)| {
                f16_at(b, 0)
                    * b[2..2 + BLOCK]
                        .iter()
                        .zip(x)
                        .map(|(&w, &x)| w as i8 as f32 * x)
                        .sum::<f32>()
            })
            .sum();
    }
    let mut acc = 0f32;
    for_each_chunk(ty, row, |c, chunk| {
        let (Some(xs), Some(sums)) = (x.x.get(c * BLOCK..(c + 1) * BLOCK), x.sums.get(c)) else {
            return;
        };
        let half = |h: usize| -> f32 {
            let r = h * 16..h * 16 + 16;
            chunk.u[r.clone()].iter().zip(&xs[r]).map(|(&u, &x)| u as f32 * x).sum()
        };
        acc += chunk.a[0] * half(0) + chunk.a[1] * half(1) + chunk.b[0] * sums[0] + chunk.b[1] * sums[1];
    });
    acc
}
