//! Budgets and the eviction schedule they resolve to once the prompt length is known.

use std::str::FromStr;

use crate::{Error, Ranking, Result};

/// How much KV cache a generation may hold.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Budget {
    /// A share of the prompt's tokens (`0.5`).
    Ratio(f64),
    /// A number of tokens (`512`).
    Tokens(usize),
    /// Bytes of keys and values over all layers (`64MiB`), converted with the model's shape.
    Bytes(u64),
}

/// The form [`FromStr`] reads back: `0.5`, `512`, `67108864B`.
impl std::fmt::Display for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // 1.0 stays a ratio: "1" would read back as one token.
            Budget::Ratio(r) if r.fract() == 0.0 => write!(f, "{r:.1}"),
            Budget::Ratio(r) => write!(f, "{r}"),
            Budget::Tokens(n) => write!(f, "{n}"),
            Budget::Bytes(b) => write!(f, "{b}B"),
        }
    }
}

impl FromStr for Budget {
    type Err = Error;

    /// `0.5` → ratio, `512` → tokens, `64MiB` / `1.5GB` / `100KB` / `4096B` → bytes.
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim();
        let bad = || {
            Error::InvalidBudget(format!(
                "'{s}' is not a ratio (0.5), a token count (512) or a size (64MiB)"
            ))
        };
        let units: [(&str, f64); 8] = [
            ("KiB", 1024.0),
            ("MiB", 1024.0 * 1024.0),
            ("GiB", 1024.0 * 1024.0 * 1024.0),
            ("KB", 1e3),
            ("MB", 1e6),
            ("GB", 1e9),
            ("K", 1024.0),
            ("B", 1.0),
        ];
        for (suffix, scale) in units {
            if let Some(num) = t.strip_suffix(suffix) {
                let v: f64 = num.trim().parse().map_err(|_| bad())?;
                if !(v.is_finite() && v > 0.0) {
                    return Err(Error::InvalidBudget(format!("'{s}' must be positive")));
                }
                return Ok(Budget::Bytes((v * scale) as u64));
            }
        }
        if let Ok(n) = t.parse::<usize>() {
            if n == 0 {
                return Err(Error::InvalidBudget("a budget of 0 tokens holds nothing".into()));
            }
            return Ok(Budget::Tokens(n));
        }
        let v: f64 = t.parse().map_err(|_| bad())?;
        if !(v.is_finite() && v > 0.0 && v <= 1.0) {
            return Err(Error::InvalidBudget(format!(
                "'{s}': a ratio of the prompt must be in (0, 1] (tokens are whole numbers: 512)"
            )));
        }
        Ok(Budget::Ratio(v))
    }
}

impl Budget {
    /// Tokens this budget allows for a prompt of `prompt_len` tokens (`None`: unlimited).
    pub fn tokens(&self, prompt_len: usize, kv_bytes_per_token: u64) -> Option<usize> {
        match *self {
            Budget::Ratio(r) if r >= 1.0 => None,
            Budget::Ratio(r) => Some((prompt_len as f64 * r) as usize),
            Budget::Tokens(n) => Some(n),
            Budget::Bytes(b) => Some((b / kv_bytes_per_token.max(1)) as usize),
        }
    }
}

/// When eviction happens (EasyKV's `kv_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Evict while the prompt is prefilled, in strides; generation then appends freely.
    Encoding,
    /// Keep the prompt whole; the budget bounds the generated tokens, one eviction per step.
    Decoding,
    /// The budget bounds prompt + generation: prefill as `Encoding` if the prompt is longer,
    /// then keep the cache at constant size while decoding.
    Auto,
    /// The whole prompt prefilled (in chunks, without evicting), then evicted down to the
    /// budget once, as kvpress compresses a prompt; generation then appends freely.
    Once,
}

impl FromStr for Mode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "encoding" => Ok(Mode::Encoding),
            "decoding" => Ok(Mode::Decoding),
            "auto" => Ok(Mode::Auto),
            "once" => Ok(Mode::Once),
            _ => Err(Error::InvalidSetting(format!(
                "unknown mode '{s}' (expected encoding, decoding, auto or once)"
            ))),
        }
    }
}

/// Everything a user sets about eviction.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EvictionConfig {
    pub budget: Budget,
    pub mode: Mode,
    /// Tokens per prefill chunk once eviction starts; also the slots evicted per chunk.
    pub stride: usize,
    /// Leading "attention sink" slots that are never evicted.
    pub sinks: usize,
    /// Share of the budget kept as a recent window during prefill.
    pub recent_ratio: f64,
    /// Score the attention of the prompt prefix that is prefilled before eviction starts.
    pub keep_attention: bool,
    /// Seed of the random policy.
    pub seed: u64,
    /// Cache keys before RoPE and rotate them with compact slot positions (StreamingLLM).
    pub streaming: bool,
    /// While decoding, evict this many slots at once every this many steps (1: every step, as
    /// EasyKV). Larger values amortize eviction; the cache then exceeds its capacity by up to
    /// `decode_stride − 1` slots between evictions.
    pub decode_stride: usize,
    /// How k-smallest selections are computed; `None` picks the backend's best.
    pub ranking: Option<Ranking>,
}

impl Default for EvictionConfig {
    fn default() -> Self {
        Self {
            budget: Budget::Ratio(0.5),
            mode: Mode::Encoding,
            stride: 8,
            sinks: 4,
            recent_ratio: 0.1,
            keep_attention: false,
            seed: 0,
            streaming: false,
            decode_stride: 1,
            ranking: None,
        }
    }
}

/// The largest prefill or decode stride accepted (far beyond any context length in use).
pub const MAX_STRIDE: usize = 1 << 20;

/// Share of the budget kept as the recent window while decoding (EasyKV's constant).
pub const DECODE_RECENT_RATIO: f64 = 0.3;
/// Trailing slots that the robust (σ) scope never offers for eviction (EasyKV's constant).
pub const ROBUST_PROTECTED_TAIL: usize = 10;

/// What an [`crate::EvictingCache`] does for one prompt: prefill chunks, capacity, windows.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Schedule {
    pub prompt_len: usize,
    /// Prefill chunk lengths, summing to `prompt_len`.
    pub prefill_chunks: Vec<usize>,
    /// Slots kept after each eviction during prefill (`None`: prefill never evicts).
    pub prefill_capacity: Option<usize>,
    /// Slots kept after each eviction during decoding (`None`: decoding never evicts).
    pub decode_capacity: Option<usize>,
    /// The budget in tokens that windows are derived from (EasyKV's `B`, stride included).
    pub budget_tokens: usize,
    pub stride: usize,
    pub sinks: usize,
    /// Recent slots never evicted during prefill.
    pub prefill_recent: usize,
    /// Recent slots never evicted during decoding.
    pub decode_recent: usize,
    /// Size of the robust-σ candidate set during prefill / decoding.
    pub prefill_robust_k: usize,
    pub decode_robust_k: usize,
    /// Slots holding positions below this are never evicted while decoding (the prompt, in
    /// decoding mode).
    pub decode_protected_positions: usize,
    pub keep_attention: bool,
    pub seed: u64,
    pub streaming: bool,
    pub decode_stride: usize,
    pub ranking: Option<Ranking>,
    /// [`Mode::Once`]: prefill chunks never evict until the prompt is complete.
    pub evict_once: bool,
}

impl EvictionConfig {
    /// Resolves the schedule for a prompt of `prompt_len` tokens; `chunk_size` splits the part
    /// of the prompt that is prefilled before eviction starts.
    /// Checks the settings that do not depend on a prompt: every caller (CLI flags, eval
    /// cells, server requests) goes through this one rule set.
    pub fn validate(&self) -> Result<()> {
        if self.stride == 0 || self.decode_stride == 0 {
            return Err(Error::InvalidSetting("stride and decode stride must be ≥ 1".into()));
        }
        if self.stride > MAX_STRIDE || self.decode_stride > MAX_STRIDE {
            return Err(Error::InvalidSetting(format!(
                "stride and decode stride must be at most {MAX_STRIDE}"
            )));
        }
        // Sinks are added to strides and windows: bounded like them (a fuzzed 2^64 − 5
        // overflowed the sum).
        if self.sinks > MAX_STRIDE {
            return Err(Error::InvalidSetting(format!("sinks must be at most {MAX_STRIDE}")));
        }
        if !(0.0..1.0).contains(&self.recent_ratio) {
            return Err(Error::InvalidSetting(format!(
                "recent ratio must be in [0, 1), got {}",
                self.recent_ratio
            )));
        }
        if matches!(self.mode, Mode::Decoding | Mode::Auto) && matches!(self.budget, Budget::Ratio(_)) {
            let mode = if self.mode == Mode::Auto { "auto" } else { "decoding" };
            return Err(Error::InvalidBudget(format!(
                "{mode} mode needs a budget in tokens or bytes"
            )));
        }
        Ok(())
    }

    /// Resolves the schedule for a prompt of `prompt_len` tokens; `chunk_size` splits the part
    /// of the prompt that is prefilled before eviction starts.
    pub fn schedule(&self, prompt_len: usize, chunk_size: usize, kv_bytes_per_token: u64) -> Result<Schedule> {
        self.validate()?;
        let s = self.stride;
        if prompt_len == 0 {
            return Err(Error::InvalidBudget("the prompt is empty".into()));
        }
        let chunk_size = chunk_size.max(1);
        let uniform = |len: usize| crate::cache::uniform_chunks(len, chunk_size);
        let mut sched = Schedule {
            prompt_len,
            prefill_chunks: uniform(prompt_len),
            prefill_capacity: None,
            decode_capacity: None,
            budget_tokens: 0,
            stride: s,
            sinks: self.sinks,
            prefill_recent: 0,
            decode_recent: 0,
            prefill_robust_k: 0,
            decode_robust_k: 0,
            decode_protected_positions: 0,
            keep_attention: self.keep_attention,
            seed: self.seed,
            streaming: self.streaming,
            decode_stride: self.decode_stride,
            ranking: self.ranking,
            evict_once: false,
        };
        let tokens = self.budget.tokens(prompt_len, kv_bytes_per_token);
        match self.mode {
            Mode::Encoding => {
                let Some(t) = tokens.filter(|&t| t < prompt_len) else {
                    return Ok(sched);
                };
                self.encoding_prefill(&mut sched, t + s, false, chunk_size)?;
            }
            Mode::Decoding => {
                let d = tokens.unwrap_or(usize::MAX);
                self.decoding(&mut sched, prompt_len, d)?;
            }
            Mode::Once => {
                let Some(t) = tokens.filter(|&t| t < prompt_len) else {
                    return Ok(sched);
                };
                if t <= self.sinks {
                    return Err(Error::InvalidBudget(format!(
                        "a budget of {t} tokens keeps no slot beyond the {} sinks",
                        self.sinks
                    )));
                }
                let recent = (t as f64 * self.recent_ratio) as usize;
                // The last chunk a whole chunk long, so a policy's query window sees it.
                let last = prompt_len.min(chunk_size);
                let mut chunks = uniform(prompt_len - last);
                chunks.push(last);
                sched.prefill_chunks = chunks;
                sched.evict_once = true;
                sched.prefill_capacity = Some(t);
                sched.budget_tokens = t;
                sched.prefill_recent = recent;
                sched.prefill_robust_k = t.saturating_sub(recent + self.sinks).max(1);
            }
            Mode::Auto => {
                let t = tokens.unwrap_or(usize::MAX);
                if t > prompt_len {
                    self.decoding(&mut sched, prompt_len, t - prompt_len)?;
                } else {
                    let b = if t + s >= prompt_len { t } else { t + s };
                    self.encoding_prefill(&mut sched, b, true, chunk_size)?;
                    let cap = sched.prefill_capacity.unwrap_or(prompt_len);
                    let recent = (b as f64 * DECODE_RECENT_RATIO) as usize;
                    sched.decode_capacity = Some(cap);
                    sched.decode_recent = recent;
                    sched.decode_robust_k = b.saturating_sub(recent).max(1);
                    sched.decode_protected_positions = 0;
                }
            }
        }
        Ok(sched)
    }

    /// EasyKV's strided prefill: final size `idx` ≤ `b` with `(n − idx) % s == 0`.
    fn encoding_prefill(&self, sched: &mut Schedule, b: usize, auto: bool, chunk_size: usize) -> Result<()> {
        let (n, s) = (sched.prompt_len, self.stride);
        let idx = (0..=b.min(n)).rev().find(|&i| (n - i) % s == 0).unwrap_or(0);
        let min = self.sinks + s + 1;
        if idx < min {
            return Err(Error::InvalidBudget(format!(
                "a budget of {} tokens (stride {s}) keeps {idx} slots of a {n}-token prompt; at least {min} are needed ({} sinks + one stride + 1)",
                b.saturating_sub(s),
                self.sinks
            )));
        }
        // The prefix prefilled before eviction starts: EasyKV takes idx − s in encoding mode and
        // the smallest positive length in auto mode.
        let r = if auto {
            (1..idx).find(|&r| (idx - r) % s == 0).unwrap_or(idx)
        } else {
            idx - s
        };
        let mut chunks = crate::cache::uniform_chunks(r, chunk_size);
        chunks.extend(std::iter::repeat_n(s, (n - r) / s));
        let recent = (b as f64 * self.recent_ratio) as usize;
        sched.prefill_chunks = chunks;
        sched.prefill_capacity = Some(idx);
        sched.budget_tokens = b;
        sched.prefill_recent = recent;
        sched.prefill_robust_k = b.saturating_sub(recent + self.sinks).max(s);
        Ok(())
    }

    fn decoding(&self, sched: &mut Schedule, n: usize, d: usize) -> Result<()> {
        if d == usize::MAX {
            return Ok(());
        }
        let recent = (d as f64 * DECODE_RECENT_RATIO) as usize;
        if d <= ROBUST_PROTECTED_TAIL.max(recent) {
            return Err(Error::InvalidBudget(format!(
                "a decoding budget of {d} tokens is too small: it must exceed {} (the protected recent window)",
                ROBUST_PROTECTED_TAIL.max(recent)
            )));
        }
        sched.budget_tokens = d;
        sched.decode_capacity = Some(n + d);
        sched.decode_recent = recent;
        sched.decode_robust_k = d - recent;
        sched.decode_protected_positions = n;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sink counts past any context are refused before they reach a sum.
    #[test]
    fn huge_sink_counts_are_refused() {
        let cfg = EvictionConfig {
            budget: Budget::Tokens(1),
            sinks: usize::MAX - 4,
            ..Default::default()
        };
        assert!(cfg.validate().is_err());
        assert!(cfg.schedule(5, 512, 4).is_err());
    }

    /// Once mode: chunks without eviction, the last a whole chunk long, one cut to the budget.
    #[test]
    fn once_mode_prefills_whole_then_cuts_once() {
        let cfg = EvictionConfig {
            budget: Budget::Tokens(637),
            mode: Mode::Once,
            sinks: 0,
            ..Default::default()
        };
        let s = cfg.schedule(1274, 512, 4).unwrap();
        assert_eq!(s.prefill_chunks, vec![512, 250, 512]);
        assert_eq!(
            (s.prefill_capacity, s.decode_capacity, s.evict_once),
            (Some(637), None, true)
        );
        // A short prompt is one chunk; a budget above the prompt keeps everything.
        assert_eq!(cfg.schedule(300, 512, 4).unwrap().prefill_chunks, vec![300]);
        assert_eq!(cfg.schedule(600, 512, 4).unwrap().prefill_capacity, None);
        let sinks_only = EvictionConfig {
            budget: Budget::Tokens(4),
            sinks: 4,
            ..cfg
        };
        assert!(sinks_only.schedule(1274, 512, 4).is_err());
    }

    #[test]
    fn parses_budgets() {
        assert_eq!("0.5".parse::<Budget>().unwrap(), Budget::Ratio(0.5));
        assert_eq!("512".parse::<Budget>().unwrap(), Budget::Tokens(512));
        assert_eq!("64MiB".parse::<Budget>().unwrap(), Budget::Bytes(64 << 20));
        assert_eq!("1.5GB".parse::<Budget>().unwrap(), Budget::Bytes(1_500_000_000));
        for bad in ["", "abc", "-1", "0", "0.0", "NaN", "-2MiB", "inf"] {
            assert!(bad.parse::<Budget>().is_err(), "{bad}");
        }
        for b in [
            Budget::Ratio(0.25),
            Budget::Ratio(1.0),
            Budget::Tokens(1),
            Budget::Bytes(64 << 20),
        ] {
            assert_eq!(b.to_string().parse::<Budget>().unwrap(), b, "{b}");
        }
    }

    #[test]
    fn encoding_schedule_matches_easykv_arithmetic() {
        // The reference summarization case: n = 1274, budget 0.5, stride 8.
        let cfg = EvictionConfig::default();
        let s = cfg.schedule(1274, 512, 1).unwrap();
        // B = int(1274·0.5)+8 = 645; idx = largest ≤ 645 with (1274−idx)%8 == 0 = 642.
        assert_eq!(s.budget_tokens, 645);
        assert_eq!(s.prefill_capacity, Some(642));
        assert_eq!(s.prefill_recent, 64);
        assert_eq!(s.prefill_robust_k, 645 - 64 - 4);
        assert_eq!(s.prefill_chunks.iter().sum::<usize>(), 1274);
        // r = idx − s = 634 prefilled first (in chunks of ≤ 512), then chunks of 8.
        assert_eq!(&s.prefill_chunks[..2], &[512, 122]);
        assert!(s.prefill_chunks[2..].iter().all(|&c| c == 8));
        assert_eq!(s.decode_capacity, None);
    }

    #[test]
    fn budget_at_or_above_the_prompt_never_evicts() {
        let cfg = EvictionConfig {
            budget: Budget::Ratio(1.0),
            ..Default::default()
        };
        let s = cfg.schedule(100, 16, 1).unwrap();
        assert_eq!((s.prefill_capacity, s.decode_capacity), (None, None));
        assert_eq!(s.prefill_chunks, vec![16, 16, 16, 16, 16, 16, 4]);
    }

    #[test]
    fn impossible_budgets_are_errors() {
        let cfg = EvictionConfig {
            budget: Budget::Tokens(3),
            ..Default::default()
        };
        assert!(cfg.schedule(1000, 64, 1).unwrap_err().to_string().contains("at least"));
        let cfg = EvictionConfig {
            mode: Mode::Decoding,
            ..Default::default()
        };
        assert!(
            cfg.schedule(1000, 64, 1).is_err(),
            "ratio budgets make no sense for decoding"
        );
        let cfg = EvictionConfig {
            mode: Mode::Decoding,
            budget: Budget::Tokens(5),
            ..Default::default()
        };
        assert!(cfg.schedule(1000, 64, 1).is_err());
        let cfg = EvictionConfig {
            stride: 0,
            ..Default::default()
        };
        assert!(cfg.schedule(1000, 64, 1).is_err());
    }

    /// One rule set for every caller: ratios in (0, 1], strides in 1..=MAX_STRIDE, modes by
    /// name, and the mode's error says it is about the mode.
    #[test]
    fn settings_are_validated_once_with_messages_that_name_the_problem() {
        assert_eq!("1.0".parse::<Budget>(), Ok(Budget::Ratio(1.0)));
        let too_big = "1.5".parse::<Budget>().unwrap_err().to_string();
        assert!(too_big.contains("(0, 1]"), "{too_big}");
        let mode = "nonsense".parse::<Mode>().unwrap_err().to_string();
        assert!(mode.contains("unknown mode") && !mode.contains("budget"), "{mode}");
        let huge = EvictionConfig {
            stride: usize::MAX,
            ..Default::default()
        };
        let err = huge.validate().unwrap_err().to_string();
        assert!(err.contains(&MAX_STRIDE.to_string()), "{err}");
        assert!(EvictionConfig::default().validate().is_ok());
    }

    #[test]
    fn bytes_budget_converts_with_the_model_shape() {
        // 1000 bytes a token, 100_000 bytes → 100 tokens, + stride 8 = 108 → idx 106 for n = 498.
        let cfg = EvictionConfig {
            budget: Budget::Bytes(100_000),
            ..Default::default()
        };
        let s = cfg.schedule(498, 512, 1000).unwrap();
        assert_eq!(s.budget_tokens, 108);
        assert_eq!(s.prefill_capacity, Some(106));
    }

    #[test]
    fn decoding_and_auto_schedules() {
        let cfg = EvictionConfig {
            mode: Mode::Decoding,
            budget: Budget::Tokens(100),
            ..Default::default()
        };
        let s = cfg.schedule(40, 512, 1).unwrap();
        assert_eq!(
            (
                s.decode_capacity,
                s.decode_recent,
                s.decode_robust_k,
                s.decode_protected_positions
            ),
            (Some(140), 30, 70, 40)
        );
        // Auto with a budget above the prompt is decoding with the remainder.
        let cfg = EvictionConfig {
            mode: Mode::Auto,
            budget: Budget::Tokens(100),
            ..Default::default()
        };
        assert_eq!(cfg.schedule(40, 512, 1).unwrap().decode_capacity, Some(100));
        // Auto below the prompt: strided prefill from a tiny prefix, then constant size.
        let s = cfg.schedule(300, 512, 1).unwrap();
        assert_eq!(s.prefill_capacity, Some(108));
        assert_eq!(s.decode_capacity, Some(108));
        assert_eq!(s.prefill_chunks[0], 4);
        assert_eq!(s.prefill_chunks.iter().sum::<usize>(), 300);
    }
}
