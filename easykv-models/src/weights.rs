//! Where weights come from, as the model loaders see it.

use crate::error::Result;

/// Where weights come from: a GGUF file, a safetensors directory, or a random generator.
///
/// Names follow GGUF (`blk.3.attn_q.weight`); matrices are returned row-major as
/// `[out_features, in_features]`, vectors as `[len]`.
pub trait WeightSource {
    fn tensor(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)>;
    fn has(&self, name: &str) -> bool;
    /// The matrix `name` in its quantized blocks, `[rows, cols]`, where the source keeps it so
    /// and [`crate::quantized`] multiplies that type; `None` otherwise.
    fn quantized(&self, _name: &str, _rows: usize, _cols: usize) -> Option<crate::quantized::QuantMatrix> {
        None
    }
}
