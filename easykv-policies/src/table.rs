//! The policies users can name: one row each. The CLI's flag parsing, help text, error
//! messages and eval defaults all read this table, so adding a policy is its file plus a row.

use burn::tensor::backend::Backend;
use easykv_core::EvictionPolicy;

use crate::{ada, expected_attention, h2o, knorm, pyramidkv, random, recency, roco, snapkv, tova, Error};

/// Makes a fresh instance of a policy (policies keep per-run state, e.g. random draws).
pub type PolicyConstructor<B> = fn() -> Box<dyn EvictionPolicy<B>>;

/// A name, what it means, and how to build it.
pub struct PolicyEntry<B: Backend> {
    pub name: &'static str,
    /// Other names accepted for it (EasyKV's, the literature's).
    pub aliases: &'static [&'static str],
    /// One line for `--help` and listings.
    pub summary: &'static str,
    /// `None`: the full cache (nothing is evicted).
    pub build: Option<PolicyConstructor<B>>,
}

impl<B: Backend> PolicyEntry<B> {
    pub fn evicting(
        name: &'static str,
        aliases: &'static [&'static str],
        summary: &'static str,
        build: PolicyConstructor<B>,
    ) -> Self {
        Self {
            name,
            aliases,
            summary,
            build: Some(build),
        }
    }

    /// Whether `name` is this entry's name or one of its aliases.
    pub fn answers_to(&self, name: &str) -> bool {
        self.name == name || self.aliases.contains(&name)
    }

    pub fn info(&self) -> PolicyInfo {
        PolicyInfo {
            name: self.name,
            aliases: self.aliases,
            summary: self.summary,
            evicts: self.build.is_some(),
        }
    }
}

/// An entry without its constructor: what help text and listings need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyInfo {
    pub name: &'static str,
    pub aliases: &'static [&'static str],
    pub summary: &'static str,
    /// `false` for the full cache.
    pub evicts: bool,
}

/// The built-in rows.
fn builtin_rows<B: Backend>() -> Vec<PolicyEntry<B>> {
    vec![
        PolicyEntry::evicting(
            "roco",
            &[],
            "mean attention, evicting among the slots of steadiest attention (Ren & Zhu 2024)",
            || Box::new(roco()),
        ),
        PolicyEntry::evicting(
            "h2o",
            &["h2o_head"],
            "accumulated attention, outside the sinks and a recent window (Zhang et al. 2023)",
            || Box::new(h2o()),
        ),
        PolicyEntry::evicting("tova", &[], "the latest query's attention (Oren et al. 2024)", || {
            Box::new(tova())
        }),
        PolicyEntry::evicting(
            "snapkv",
            &[],
            "the attention of the latest 64 queries, pooled over 5 slots; keeps those queries' own slots (Li et al. 2024)",
            || Box::new(snapkv()),
        ),
        PolicyEntry::evicting(
            "pyramidkv",
            &[],
            "snapkv's score with per-layer budgets shrinking with depth, in --mode once (Cai et al. 2024)",
            || Box::new(pyramidkv()),
        ),
        PolicyEntry::evicting(
            "knorm",
            &[],
            "keys of smallest L2 norm kept; reads no attention (Devoto et al. 2024)",
            || Box::new(knorm()),
        ),
        PolicyEntry::evicting(
            "expected-attention",
            &["expected_attention"],
            "attention expected from future queries (the prompt's query mean and covariance, RoPE averaged over the next 512 positions) times the value norm (Devoto et al. 2025)",
            || Box::new(expected_attention()),
        ),
        PolicyEntry::evicting(
            "ada-snapkv",
            &["adakv"],
            "snapkv's score with per-head budgets in --mode once, each head's slots stored on their own (AdaKV, Feng et al. 2024)",
            || Box::new(ada(snapkv())),
        ),
        PolicyEntry::evicting(
            "ada-expected-attention",
            &[],
            "expected attention with per-head budgets in --mode once (AdaKV)",
            || Box::new(ada(expected_attention())),
        ),
        PolicyEntry::evicting(
            "ada-roco",
            &[],
            "roco's mean attention with per-head budgets in --mode once (AdaKV)",
            || Box::new(ada(roco())),
        ),
        PolicyEntry::evicting(
            "ada-h2o",
            &[],
            "h2o's accumulated attention with per-head budgets in --mode once (AdaKV)",
            || Box::new(ada(h2o())),
        ),
        PolicyEntry::evicting(
            "ada-knorm",
            &[],
            "knorm's key norms with per-head budgets in --mode once (AdaKV)",
            || Box::new(ada(knorm())),
        ),
        PolicyEntry::evicting(
            "recency",
            &["streamingllm"],
            "the sinks and the newest tokens (StreamingLLM, Xiao et al. 2024)",
            || Box::new(recency()),
        ),
        PolicyEntry::evicting(
            "random",
            &[],
            "uniformly random outside the sinks, seeded: the floor to beat",
            || Box::new(random()),
        ),
        PolicyEntry {
            name: "full",
            aliases: &[],
            summary: "no eviction: the cache holds every token (the reference)",
            build: None,
        },
    ]
}

/// Policies by name.
pub struct PolicyTable<B: Backend> {
    entries: Vec<PolicyEntry<B>>,
}

impl<B: Backend> Default for PolicyTable<B> {
    fn default() -> Self {
        Self::builtin()
    }
}

impl<B: Backend> PolicyTable<B> {
    /// easykv's policies.
    pub fn builtin() -> Self {
        Self {
            entries: builtin_rows(),
        }
    }

    /// The table with `entry` added, replacing an entry of the same name.
    pub fn with(mut self, entry: PolicyEntry<B>) -> Self {
        self.entries.retain(|e| e.name != entry.name);
        self.entries.push(entry);
        self
    }

    pub fn entries(&self) -> &[PolicyEntry<B>] {
        &self.entries
    }

    /// The entry `name` (or an alias) names.
    pub fn get(&self, name: &str) -> Result<&PolicyEntry<B>, Error> {
        self.entries
            .iter()
            .find(|e| e.answers_to(name))
            .ok_or_else(|| Error::UnknownPolicy {
                name: name.to_string(),
                valid: self.names().join(", "),
            })
    }

    /// A fresh instance of the policy `name` names; `Ok(None)` for the full cache.
    pub fn build(&self, name: &str) -> Result<Option<Box<dyn EvictionPolicy<B>>>, Error> {
        Ok(self.get(name)?.build.map(|build| build()))
    }

    /// The canonical names, in table order.
    pub fn names(&self) -> Vec<&'static str> {
        self.entries.iter().map(|e| e.name).collect()
    }
}

/// The built-in rows without their constructors (for help text, flag parsing and listings,
/// which know no backend). flex stands in for the backend: only the constructors depend on it.
pub fn builtin_policies() -> Vec<PolicyInfo> {
    PolicyTable::<burn::backend::Flex>::builtin()
        .entries()
        .iter()
        .map(PolicyEntry::info)
        .collect()
}

/// The canonical name of the built-in policy `name` (or an alias) names.
pub fn canonical_policy_name(name: &str) -> Result<&'static str, Error> {
    PolicyTable::<burn::backend::Flex>::builtin().get(name).map(|e| e.name)
}
