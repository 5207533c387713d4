//! A model ready to run: weights on a device, its tokenizer and chat template.

use std::path::{Path, PathBuf};

use burn::prelude::*;

use crate::chat::ChatTemplate;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::gguf::{GgufFile, MetaValue};
use crate::hf::{self, HfModelDir};
use crate::linear::WeightDType;
use crate::model::{load_model, CausalLm};
use crate::tokenizer::TextTokenizer;

/// Everything loaded from one model file.
pub struct LoadedModel<B: Backend> {
    pub model: Box<dyn CausalLm<B>>,
    pub config: ModelConfig,
    pub tokenizer: TextTokenizer,
    pub chat_template: Option<ChatTemplate>,
    pub path: PathBuf,
    pub name: String,
    /// Storage precision of the weights, and of the KV cache built for this model.
    pub dtype: WeightDType,
}

impl<B: Backend> LoadedModel<B> {
    /// Loads a GGUF file, or a Hugging Face model directory when `path` is a directory.
    pub fn open(path: &Path, dtype: WeightDType, device: &B::Device) -> Result<Self> {
        if dtype.packed_activations().is_some() && !crate::backend::BackendProfile::detect::<B>(device).host_resident()
        {
            return Err(Error::Unsupported(
                "--dtype native, q16 and q8 (quantized weights in place) run on the CPU; use f16 or bf16 on GPUs"
                    .into(),
            ));
        }
        if path.is_dir() {
            Self::from_hf_dir(path, dtype, device)
        } else {
            Self::from_gguf(path, dtype, device)
        }
    }

    /// Loads a Hugging Face model directory (config.json, safetensors, tokenizer.json,
    /// tokenizer_config.json) onto `device`.
    pub fn from_hf_dir(dir: &Path, dtype: WeightDType, device: &B::Device) -> Result<Self> {
        let weights = HfModelDir::open(dir)?;
        let config = weights.config.model_config()?;
        let tok_cfg = hf::tokenizer_config(dir)?;
        let tokenizer =
            TextTokenizer::from_hf_file(&dir.join("tokenizer.json"), &tok_cfg, &hf::generation_stop_ids(dir)?)?;
        let chat_template = tok_cfg.chat_template.as_ref().map(|t| {
            ChatTemplate::new(
                t.as_str(),
                tok_cfg.bos_token.clone().unwrap_or_default(),
                tok_cfg.eos_token.clone().unwrap_or_default(),
            )
        });
        let model = load_model(&config, &weights, dtype, device)?;
        let name = dir
            .file_name()
            .map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into_owned());
        Ok(Self {
            model,
            config,
            tokenizer,
            chat_template,
            path: dir.to_path_buf(),
            name,
            dtype,
        })
    }

    /// Loads a GGUF file onto `device`, matrices stored in `dtype`.
    pub fn from_gguf(path: &Path, dtype: WeightDType, device: &B::Device) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let config = ModelConfig::from_gguf(&file)?;
        let tokenizer = TextTokenizer::from_gguf(&file)?;
        let token_text = |key: &str| {
            file.meta(key)
                .and_then(MetaValue::as_u64)
                .and_then(|id| {
                    file.meta("tokenizer.ggml.tokens")?
                        .as_array()?
                        .get(id as usize)?
                        .as_str()
                        .map(str::to_owned)
                })
                .unwrap_or_default()
        };
        let chat_template = file
            .meta("tokenizer.chat_template")
            .and_then(MetaValue::as_str)
            .map(|t| {
                ChatTemplate::new(
                    t,
                    token_text("tokenizer.ggml.bos_token_id"),
                    token_text("tokenizer.ggml.eos_token_id"),
                )
            });
        let model = load_model(&config, &file, dtype, device)?;
        let name = file
            .meta("general.name")
            .and_then(MetaValue::as_str)
            .map_or_else(|| path.display().to_string(), str::to_owned);
        Ok(Self {
            model,
            config,
            tokenizer,
            chat_template,
            path: path.to_path_buf(),
            name,
            dtype,
        })
    }
}
