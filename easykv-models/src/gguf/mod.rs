//! GGUF reading and dequantization (ours: no small, complete, permissively licensed crate exists).

mod quant;
mod reader;

pub use quant::{dequantize, GgmlType};
pub use reader::{GgufFile, MetaValue, TensorBlocks, TensorInfo};

#[cfg(test)]
mod tests;

impl crate::weights::WeightSource for GgufFile {
    /// GGUF lists dimensions fastest-first; weight sources answer row-major, slowest-first.
    fn tensor(&self, name: &str) -> crate::error::Result<(Vec<f32>, Vec<usize>)> {
        let (data, mut dims) = self.dequantize(name)?;
        dims.reverse();
        Ok((data, dims))
    }

    fn has(&self, name: &str) -> bool {
        self.tensor_info(name).is_some()
    }

    fn quantized(&self, name: &str, rows: usize, cols: usize) -> Option<crate::quantized::QuantMatrix> {
        let info = self.tensor_info(name)?;
        // GGUF lists the row length first; trailing ones are no dimension.
        let dims: Vec<u64> = info.dims.iter().copied().rev().skip_while(|&d| d == 1).collect();
        if dims != [rows as u64, cols as u64] {
            return None;
        }
        match self.tensor_blocks(info).ok()? {
            TensorBlocks::Shared(file, range) => {
                crate::quantized::QuantMatrix::shared(info.ggml_type, rows, cols, file, range)
            }
            TensorBlocks::Read(bytes) => crate::quantized::QuantMatrix::owned(info.ggml_type, rows, cols, bytes),
        }
    }
}
