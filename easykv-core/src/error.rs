/// The one error type of easykv-core.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum Error {
    #[error("layer {layer} is out of range: the cache has {layers} layers")]
    LayerOutOfRange { layer: usize, layers: usize },
    #[error("invalid budget: {0}")]
    InvalidBudget(String),
    #[error("invalid eviction setting: {0}")]
    InvalidSetting(String),
    #[error("the cache would hold {needed} tokens, more than the model's context of {context}")]
    ContextExceeded { needed: usize, context: usize },
    #[error(
        "the cache's layers are out of step: a chunk ended for all layers while some had taken more tokens than others"
    )]
    LayersOutOfStep,
    #[error("layer {layer}: {slots} slots committed without room reserved for them")]
    SlotsNotReserved { layer: usize, slots: usize },
    #[error("layer {layer}: its heads keep slots of their own, and the new keys and values do not match their batch and heads")]
    RaggedShape { layer: usize },
}

pub type Result<T> = std::result::Result<T, Error>;
