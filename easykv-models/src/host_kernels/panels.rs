//! `x·Wᵀ` for f32 weights repacked into panels of 16 outputs (`[panel][in][16]`): each step
//! of the inner loop broadcasts one input of a few activation rows and multiplies it into 16
//! outputs per vector, so a register tile holds outputs, not partial sums — no horizontal
//! reductions (a dot product per output, over `[out, in]` rows, ends by reducing its vector
//! across lanes), and each weight vector is loaded once per tile of up to 8 rows. At prefill
//! sizes the tiles run at 360–475 GFLOP/s on the CI machine's two AVX-512 cores, near the 518
//! of a plain FMA loop (docs/benchmarks.md).
//!
//! Every output is one fused multiply-add chain over `in` in order (`acc = w·x + acc`, from
//! 0), whatever tile, row count or instruction set computes it: a sequence decoded in a batch
//! gets exactly the logits it gets alone.

use pulp::Simd;
use rayon::prelude::*;

/// Outputs per panel.
pub const PANEL: usize = 16;

/// Rows of `x` a task takes at once.
const X_BLOCK: usize = 64;

/// An `[out, in]` f32 matrix as panels of [`PANEL`] outputs, each `[in][PANEL]` (the last
/// panel padded with zero rows).
#[derive(Debug, Clone)]
pub struct PanelMatrix {
    out: usize,
    inp: usize,
    data: Vec<f32>,
}

impl PanelMatrix {
    /// Outputs of the widest register tile (a product whose outputs are a multiple of this
    /// runs only whole tiles).
    pub const TILE_OUTPUTS: usize = 3 * PANEL;

    /// From a row-major `[out, in]` matrix; `None` when `w` is not `out × in` values.
    pub fn pack(w: &[f32], out: usize, inp: usize) -> Option<Self> {
        if out.checked_mul(inp)? != w.len() {
            return None;
        }
        let panels = out.div_ceil(PANEL);
        let mut data = vec![0f32; panels * inp * PANEL];
        data.par_chunks_mut(inp * PANEL).enumerate().for_each(|(p, panel)| {
            for (l, row) in w.chunks(inp.max(1)).skip(p * PANEL).take(PANEL).enumerate() {
                for (k, &v) in row.iter().enumerate() {
                    panel[k * PANEL + l] = v;
                }
            }
        });
        Some(Self { out, inp, data })
    }

    pub fn out(&self) -> usize {
        self.out
    }

    pub fn inp(&self) -> usize {
        self.inp
    }

    /// The matrix `[out, in]`, row-major.
    pub fn to_rows(&self) -> Vec<f32> {
        (0..self.out).flat_map(|o| self.row(o)).collect()
    }

    /// Row `o` of the matrix (an embedding table's lookup).
    pub fn row(&self, o: usize) -> Vec<f32> {
        let panel = &self.data[(o / PANEL) * self.inp * PANEL..][..self.inp * PANEL];
        panel.iter().skip(o % PANEL).step_by(PANEL).copied().collect()
    }

    /// `x·Wᵀ` for `x` `[rows, in]` (row-major): `[rows, out]`. Panels are split over rayon's
    /// threads; each task's panels meet a block of rows from cache and write their outputs in
    /// place.
    pub fn product(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let (out, inp) = (self.out, self.inp);
        // Rows past the end of `x` are left zero.
        let filled = rows.min(x.len() / inp.max(1));
        let panels = out.div_ceil(PANEL);
        // Rows as wide as the panels; cut to `out` at the end where a panel is partial.
        let width = panels * PANEL;
        let mut y = vec![0f32; rows * width];
        if filled == 0 || out == 0 || inp == 0 {
            y.truncate(rows * out);
            return y;
        }
        // About 32 Ki weights per task, whole groups of three panels.
        let per_task = ((super::PARALLEL_ELEMENTS / (inp * PANEL)) / 3 * 3).clamp(3, 48);
        let p_blocks = panels.div_ceil(per_task);
        // Tasks panel block first: a thread's consecutive tasks share their panels, which stay
        // in cache while the rows stream (a large matrix is read from memory once).
        let x_blocks = filled.div_ceil(X_BLOCK);
        let mut parts: Vec<Vec<&mut [f32]>> = (0..x_blocks * p_blocks)
            .map(|_| Vec::with_capacity(filled.min(X_BLOCK)))
            .collect();
        for (j, row) in y.chunks_mut(width).take(filled).enumerate() {
            for (pb, piece) in row.chunks_mut(per_task * PANEL).enumerate() {
                parts[pb * x_blocks + j / X_BLOCK].push(piece);
            }
        }
        let arch = pulp::Arch::new();
        parts.into_par_iter().enumerate().for_each(|(t, y)| {
            let (pb, xb) = (t / x_blocks, t % x_blocks);
            let (p0, p1) = (pb * per_task, ((pb + 1) * per_task).min(panels));
            let r0 = xb * X_BLOCK;
            arch.dispatch(Tile {
                w: &self.data[p0 * inp * PANEL..p1 * inp * PANEL],
                inp,
                x: &x[r0 * inp..(r0 + y.len()) * inp],
                y,
            });
        });
        if width != out {
            for r in 1..rows {
                y.copy_within(r * width..r * width + out, r * out);
            }
            y.truncate(rows * out);
        }
        y
    }
}

/// A block of panels against a block of rows: per row, its outputs for the panels.
struct Tile<'a> {
    w: &'a [f32],
    inp: usize,
    x: &'a [f32],
    y: Vec<&'a mut [f32]>,
}

impl pulp::WithSimd for Tile<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        match S::F32_LANES {
            16 => self.run::<S, 1, 8, { PanelMatrix::TILE_OUTPUTS / PANEL }>(simd),
            // AVX2's 16 registers: 12 accumulators, two weight vectors and the broadcast.
            8 => self.run::<S, 2, 6, 1>(simd),
            _ => self.scalar(),
        }
    }
}

impl Tile<'_> {
    /// `V` vectors per panel; tiles of `MR` rows × `NP` panels.
    #[inline(always)]
    fn run<S: Simd, const V: usize, const MR: usize, const NP: usize>(mut self, simd: S) {
        let inp = self.inp;
        let panels = self.w.len() / (inp * PANEL);
        let mut p = 0;
        while p < panels {
            let np = (panels - p).min(NP);
            let w = &self.w[p * inp * PANEL..(p + np) * inp * PANEL];
            if np == NP {
                rows_of::<S, V, MR, NP>(simd, w, self.x, inp, &mut self.y, p * PANEL);
            } else {
                // The last panels one at a time (the same sums).
                for (q, w) in w.chunks(inp * PANEL).enumerate() {
                    rows_of::<S, V, MR, 1>(simd, w, self.x, inp, &mut self.y, (p + q) * PANEL);
                }
            }
            p += np;
        }
    }

    /// Without vectors of 8 or 16 lanes: the same chains, one output at a time.
    fn scalar(self) {
        let inp = self.inp;
        for (x, y) in self.x.chunks(inp).zip(self.y) {
            for (o, out) in y.iter_mut().enumerate() {
                let panel = &self.w[(o / PANEL) * inp * PANEL..];
                *out = (0..inp).fold(0f32, |acc, k| panel[k * PANEL + o % PANEL].mul_add(x[k], acc));
            }
        }
    }
}

/// Every row of `x` × `NP` panels, `MR` rows at a time, into outputs `o..` of each row of `y`.
#[inline(always)]
fn rows_of<S: Simd, const V: usize, const MR: usize, const NP: usize>(
    simd: S,
    w: &[f32],
    x: &[f32],
    inp: usize,
    y: &mut [&mut [f32]],
    o: usize,
) {
    let rows = y.len();
    let mut r = 0;
    while r < rows {
        let mr = (rows - r).min(MR);
        let (x, y) = (&x[r * inp..(r + mr) * inp], &mut y[r..r + mr]);
        match mr {
            m if m == MR => kernel::<S, V, MR, NP>(simd, w, x, inp, y, o),
            1 => kernel::<S, V, 1, NP>(simd, w, x, inp, y, o),
            2 => kernel::<S, V, 2, NP>(simd, w, x, inp, y, o),
            3 => kernel::<S, V, 3, NP>(simd, w, x, inp, y, o),
            4 => kernel::<S, V, 4, NP>(simd, w, x, inp, y, o),
            5 => kernel::<S, V, 5, NP>(simd, w, x, inp, y, o),
            6 => kernel::<S, V, 6, NP>(simd, w, x, inp, y, o),
            _ => kernel::<S, V, 7, NP>(simd, w, x, inp, y, o),
        }
        r += mr;
    }
}

/// `MR` rows of `x` (`[MR, in]`) × `NP` panels (`[NP][in][PANEL]`) into outputs `o..` of
/// each row of `y`.
#[inline(always)]
fn kernel<S: Simd, const V: usize, const MR: usize, const NP: usize>(
    simd: S,
    w: &[f32],
    x: &[f32],
    inp: usize,
    y: &mut [&mut [f32]],
    o: usize,
) {
    let panels: [&[S::f32s]; NP] = std::array::from_fn(|q| {
        let (v, _) = S::as_simd_f32s(&w[q * inp * PANEL..(q + 1) * inp * PANEL]);
        &v[..inp * V]
    });
    let xs: [&[f32]; MR] = std::array::from_fn(|j| &x[j * inp..(j + 1) * inp]);
    let mut acc = [[[simd.splat_f32s(0.0); V]; NP]; MR];
    for k in 0..inp {
        let wk: [[S::f32s; V]; NP] = std::array::from_fn(|q| std::array::from_fn(|c| panels[q][k * V + c]));
        for j in 0..MR {
            let xb = simd.splat_f32s(xs[j][k]);
            for q in 0..NP {
                for c in 0..V {
                    acc[j][q][c] = simd.mul_add_f32s(wk[q][c], xb, acc[j][q][c]);
                }
            }
        }
    }
    for j in 0..MR {
        for q in 0..NP {
            let dst = &mut y[j][o + q * PANEL..][..PANEL];
            let (dv, _) = S::as_mut_simd_f32s(dst);
            dv[..V].copy_from_slice(&acc[j][q]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Each row's outputs are the same bits at every row count and equal the plain chain.
    #[test]
    fn products_are_exact_across_row_counts() {
        for (out, inp, n) in [(67usize, 13usize, 9usize), (301, 576, 17), (50, 40, 150), (16, 1, 3)] {
            let w = random(out * inp, 1);
            let x = random(n * inp, 2);
            let m = PanelMatrix::pack(&w, out, inp).unwrap();
            let want: Vec<f32> = x
                .chunks(inp)
                .flat_map(|xr| {
                    w.chunks(inp)
                        .map(|wr| wr.iter().zip(xr).fold(0f32, |a, (p, q)| p.mul_add(*q, a)))
                        .collect::<Vec<_>>()
                })
                .collect();
            for rows in (1..=9.min(n)).chain([n]) {
                let y = m.product(&x[..rows * inp], rows);
                assert_eq!(&y[..], &want[..rows * out], "{out}×{inp}, {rows} rows");
            }
            for o in [0, out / 2, out - 1] {
                assert_eq!(m.row(o), w[o * inp..(o + 1) * inp].to_vec());
            }
        }
    }

    /// The AVX2 tiles and the scalar loop give the AVX-512 tiles' bits.
    #[test]
    fn every_instruction_set_sums_alike() {
        let (out, inp, rows) = (83usize, 37usize, 11usize);
        let (w, x) = (random(out * inp, 8), random(rows * inp, 9));
        let m = PanelMatrix::pack(&w, out, inp).unwrap();
        let want = m.product(&x, rows);
        let width = out.div_ceil(PANEL) * PANEL;
        let run = |simd: &dyn Fn(Tile)| {
            let mut y = vec![0f32; rows * width];
            simd(Tile {
                w: &m.data,
                inp,
                x: &x,
                y: y.chunks_mut(width).collect(),
            });
            y.chunks(width).flat_map(|r| r[..out].to_vec()).collect::<Vec<f32>>()
        };
        assert_eq!(run(&|t| Simd::vectorize(pulp::Scalar::new(), t)), want);
        #[cfg(target_arch = "x86_64")]
        if let Some(v3) = pulp::x86::V3::try_new() {
            assert_eq!(run(&|t| Simd::vectorize(v3, t)), want);
        }
    }

    /// `cargo test --release -p easykv-models --lib panels::tests::speed -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn speed() {
        let shapes = [(960usize, 576usize), (576, 576), (3072, 576), (576, 1536), (49152, 576)];
        // Qwen2.5-1.5B's: q|k|v, o, gate|up, down.
        let qwen = [(682, 1536), (117, 8960), (17920, 1536)];
        for (out, inp) in shapes.into_iter().chain(qwen) {
            let w = random(out * inp, 3);
            let m = PanelMatrix::pack(&w, out, inp).unwrap();
            for rows in [1, 16, 128, 512] {
                let x = random(rows * inp, 4);
                let iters = (2e9 / (2.0 * (out * inp * rows) as f64)).clamp(1.0, 20.0) as usize;
                let best = (0..5)
                    .map(|_| {
                        let t = std::time::Instant::now();
                        for _ in 0..iters {
                            std::hint::black_box(m.product(&x, rows));
                        }
                        t.elapsed().as_secs_f64() / iters as f64
                    })
                    .fold(f64::MAX, f64::min);
                let gflops = 2.0 * (out * inp * rows) as f64 / best / 1e9;
                println!("{out} × {inp}, {rows} rows: {:.3} ms, {gflops:.1} GFLOP/s", best * 1e3);
            }
        }
    }

    /// Every product of a SmolLM2 step in a row, weights streamed from memory (30 layers'
    /// worth, 540 MB), at 1–16 rows.
    /// `cargo test --release -p easykv-models --lib panels::tests::model_step -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn model_step() {
        let shapes = [(960usize, 576usize), (576, 576), (3072, 576), (576, 1536)];
        let ms: Vec<PanelMatrix> = (0..30)
            .flat_map(|_| shapes.iter())
            .chain([&(49152, 576)])
            .map(|&(o, i)| PanelMatrix::pack(&random(o * i, 5), o, i).unwrap())
            .collect();
        for rows in [1usize, 4, 8, 16] {
            let (x576, x1536) = (random(rows * 576, 6), random(rows * 1536, 7));
            for _ in 0..3 {
                let t = std::time::Instant::now();
                for m in &ms {
                    let x = if m.inp() == 576 { &x576 } else { &x1536 };
                    std::hint::black_box(m.product(x, rows));
                }
                println!("{rows} rows: {:.2} ms per step", t.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
}
