//! Writing a chunk's attention statistics straight into every layer's stacked rows.
//!
//! An evicting prefill observes each layer's probabilities `[batch, heads, s, slots]` and
//! reduces them to three rows per head (sum over the chunk's queries, sum of squares, the last
//! query's row). Done with tensor operations that is four operations per layer plus, per
//! chunk, stacking every layer's rows — each one a kernel launch on a GPU, where launches are
//! what a prefill's short strides wait for. A backend with a kernel for it installs an
//! [`ObservationWriter`] (the kernels live with the model code, as the row rankers do).

use burn::tensor::{backend::Backend, Tensor};

use crate::registry::PerBackend;

/// Writes the column statistics of `probs` (`[batch, heads, s, slots]`, f32) — the sum over
/// its `s` queries, the sum of squares, the last query's row — into rows `row..row + batch` of
/// the three `[rows, heads, slots]` f32 buffers, in their own memory (the caller's tensors see
/// the values). Hands `probs` back when it cannot.
pub type ObservationWriter<B> = fn(Tensor<B, 4>, [&Tensor<B, 3>; 3], usize) -> std::result::Result<(), Tensor<B, 4>>;

static WRITERS: PerBackend = PerBackend::new();

/// Makes `writer` the way evicting caches on backend `B` record prefill chunks.
pub fn install_observation_writer<B: Backend>(writer: ObservationWriter<B>) {
    WRITERS.install::<B, _>(
        writer,
        std::ptr::fn_addr_eq::<ObservationWriter<B>, ObservationWriter<B>>,
    );
}

/// The writer installed for `B`, if any.
pub(crate) fn observation_writer<B: Backend>() -> Option<ObservationWriter<B>> {
    WRITERS.get::<B, ObservationWriter<B>>()
}
