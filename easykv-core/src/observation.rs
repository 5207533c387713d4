//! Writing a chunk's attention statistics straight into every layer's stacked rows.
//!
//! An evicting prefill observes each layer's probabilities `[batch, heads, s, slots]` and
//! reduces them to three rows per head (sum over the chunk's queries, sum of squares, the last
//! query's row). Done with tensor operations that is four operations per layer plus, per
//! chunk, stacking every layer's rows — each one a kernel launch on a GPU, where launches are
//! what a prefill's short strides wait for. A backend with a kernel for it installs an
//! [`ObservationWriter`] (the kernels live with the model code, as the row rankers do).

use std::any::{Any, TypeId};
use std::sync::RwLock;

use burn::tensor::{backend::Backend, Tensor};

/// Writes the column statistics of `probs` (`[batch, heads, s, slots]`, f32) — the sum over
/// its `s` queries, the sum of squares, the last query's row — into rows `row..row + batch` of
/// the three `[rows, heads, slots]` f32 buffers, in their own memory (the caller's tensors see
/// the values). Hands `probs` back when it cannot.
pub type ObservationWriter<B> = fn(Tensor<B, 4>, [&Tensor<B, 3>; 3], usize) -> std::result::Result<(), Tensor<B, 4>>;

static WRITERS: RwLock<Vec<(TypeId, Box<dyn Any + Send + Sync>)>> = RwLock::new(Vec::new());

/// Makes `writer` the way evicting caches on backend `B` record prefill chunks.
pub fn install_observation_writer<B: Backend>(writer: ObservationWriter<B>) {
    if observation_writer::<B>().is_some_and(|w| std::ptr::fn_addr_eq(w, writer)) {
        return;
    }
    let id = TypeId::of::<B>();
    if let Ok(mut writers) = WRITERS.write() {
        writers.retain(|(t, _)| *t != id);
        writers.push((id, Box::new(writer)));
    }
}

/// The writer installed for `B`, if any.
pub(crate) fn observation_writer<B: Backend>() -> Option<ObservationWriter<B>> {
    let writers = WRITERS.read().ok()?;
    writers
        .iter()
        .find(|(t, _)| *t == TypeId::of::<B>())
        .and_then(|(_, f)| f.downcast_ref::<ObservationWriter<B>>().copied())
}
