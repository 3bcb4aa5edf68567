//! The Llama-family decoder (Llama, Qwen2 = Llama + qkv bias) over HF-named weights.
//!
//! Two paths share the same weights:
//! - [`Decoder::forward`]: the whole sequence at once, causal + padding mask, built only from
//!   differentiable ops (training, scoring);
//! - [`Decoder::forward_step`]: new tokens against an external [`KvCache`], with fused
//!   inference kernels (sampling). The cache lives outside the model, so one model serves many
//!   concurrent caches.
//!
//! The decoder knows nothing about tokenization or chat templates.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};

use super::attention_gpu;
use super::bf16_gemm::{self, Operand, PackedB};
use super::bf16_linear;
use super::bf16_matmul;
use super::config::{Head, ModelConfig};
use super::embedding_gpu;
use super::fused;
use super::fused_attention;
use super::fused_mlp;
use super::fused_rope;
use super::fused_softmax;
use super::fused_swiglu;
use super::grad_sink::{self, GradSink};
use super::kv_cache::KvCache;
use super::ops;
use super::params::parameter_specs;
use super::rope::Rope;
use crate::device::Kernels;
use crate::error::{Error, Result};

/// A large negative additive bias for masked attention scores. Finite (not -inf) so that a
/// query row whose keys are all masked (a padding position) gives a uniform row, not NaN.
pub(super) const MASKED: f32 = -1e9;

/// A linear layer's weight [out, in] and bias.
struct Proj {
    weight: Tensor,
    bias: Option<Tensor>,
    /// The weight's bf16 panels for `forward_step` under bf16 autocast, packed on first use:
    /// decoding multiplies a few rows by the same weights every step, so packing them each
    /// time would cost as much as the product, and the panels are half the f32 bytes to read.
    packed: OnceLock<PackedB>,
}

impl Proj {
    fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Proj {
            weight,
            bias,
            packed: OnceLock::new(),
        }
    }
}

struct Attention {
    q: Proj,
    k: Proj,
    v: Proj,
    o: Proj,
    /// q, k and v's weights (and biases) as one, for decoding steps off the CPU
    /// ([`Decoder::qkv_joint`]), made on first use; `None` where only some have a bias.
    joint: OnceLock<Option<(Tensor, Option<Tensor>)>>,
}

impl Attention {
    /// q, k and v's weights concatenated (their rows stacked) and their biases likewise, or
    /// `None` where only some projections have a bias.
    fn concatenated(&self) -> Result<Option<(Tensor, Option<Tensor>)>> {
        let (q, k, v) = (&self.q, &self.k, &self.v);
        let bias = match (&q.bias, &k.bias, &v.bias) {
            (Some(bq), Some(bk), Some(bv)) => Some(Tensor::cat(&[bq, bk, bv], 0)?),
            (None, None, None) => None,
            _ => return Ok(None),
        };
        let weight = Tensor::cat(&[&q.weight, &k.weight, &v.weight], 0)?;
        Ok(Some((weight, bias)))
    }

    /// [`Attention::concatenated`], made once (decoding steps read the same weights each time).
    fn joint(&self) -> Result<Option<&(Tensor, Option<Tensor>)>> {
        if self.joint.get().is_none() {
            // A racing first use made the same tensors; either is kept.
            let _ = self.joint.set(self.concatenated()?);
        }
        Ok(self.joint.get().and_then(Option::as_ref))
    }
}

struct Mlp {
    gate: Proj,
    up: Proj,
    down: Proj,
}

struct Layer {
    input_norm: Tensor,
    attention: Attention,
    post_attention_norm: Tensor,
    mlp: Mlp,
}

/// Which positions' logits `forward_step` computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsAt {
    /// Only the last position of each row: [B, V]. What sampling needs.
    Last,
    /// Every new position: [B, T, V].
    All,
}

pub struct Decoder {
    config: ModelConfig,
    params: BTreeMap<String, Tensor>,
    embed_tokens: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    /// The output projection: `lm_head.weight`, the embedding when tied, or `score.weight`.
    head: Tensor,
    /// The head's bf16 panels for `forward_step` (see [`Proj::packed`]).
    head_packed: OnceLock<PackedB>,
    rope: Rope,
    /// The layers' linear products in bf16 with f32 accumulation (CPU autocast, see
    /// [`Decoder::with_bf16_linears`]).
    bf16_linears: bool,
    /// Where a training step's parameter gradients of the embedding and head go
    /// ([`Decoder::with_grad_sink`]).
    grad_sink: Option<GradSink>,
}

impl Decoder {
    /// Builds the decoder from HF-named tensors, checking every name and shape.
    /// `source` names the checkpoint in errors. Extra tensors (e.g. old `rotary_emb.inv_freq`
    /// buffers, or `lm_head.weight` of a tied model) are ignored.
    pub fn new(
        config: ModelConfig,
        mut tensors: BTreeMap<String, Tensor>,
        source: &Path,
    ) -> Result<Self> {
        let mut params = BTreeMap::new();
        for spec in parameter_specs(&config) {
            let t = tensors.remove(&spec.name).ok_or_else(|| {
                Error::file(
                    source,
                    format!(
                        "tensor `{}` is missing (expected shape {:?})",
                        spec.name, spec.shape
                    ),
                )
            })?;
            if t.dims() != spec.shape.as_slice() {
                return Err(Error::file(
                    source,
                    format!(
                        "tensor `{}` has shape {:?} but config.json implies {:?}",
                        spec.name,
                        t.dims(),
                        spec.shape
                    ),
                ));
            }
            params.insert(spec.name, t);
        }
        Self::from_params(config, params)
    }

    /// Builds from an already validated parameter map (e.g. the optimizer's variables).
    pub fn from_params(config: ModelConfig, params: BTreeMap<String, Tensor>) -> Result<Self> {
        let get = |name: &str| -> Result<Tensor> {
            params
                .get(name)
                .cloned()
                .ok_or_else(|| Error::invalid(format!("parameter `{name}` missing")))
        };
        let get_opt = |name: &str| params.get(name).cloned();
        let proj = |prefix: &str| -> Result<Proj> {
            Ok(Proj::new(
                get(&format!("{prefix}.weight"))?,
                get_opt(&format!("{prefix}.bias")),
            ))
        };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            layers.push(Layer {
                input_norm: get(&format!("{p}.input_layernorm.weight"))?,
                attention: Attention {
                    q: proj(&format!("{p}.self_attn.q_proj"))?,
                    k: proj(&format!("{p}.self_attn.k_proj"))?,
                    v: proj(&format!("{p}.self_attn.v_proj"))?,
                    o: proj(&format!("{p}.self_attn.o_proj"))?,
                    joint: OnceLock::new(),
                },
                post_attention_norm: get(&format!("{p}.post_attention_layernorm.weight"))?,
                mlp: Mlp {
                    gate: proj(&format!("{p}.mlp.gate_proj"))?,
                    up: proj(&format!("{p}.mlp.up_proj"))?,
                    down: proj(&format!("{p}.mlp.down_proj"))?,
                },
            });
        }
        let embed_tokens = get("model.embed_tokens.weight")?;
        let head = match config.head {
            Head::SequenceClassification => get("score.weight")?,
            Head::CausalLm if config.tie_word_embeddings => embed_tokens.clone(),
            Head::CausalLm => get("lm_head.weight")?,
        };
        Ok(Decoder {
            rope: Rope::new(&config),
            norm: get("model.norm.weight")?,
            embed_tokens,
            layers,
            head,
            params,
            config,
            bf16_linears: false,
            grad_sink: None,
            head_packed: OnceLock::new(),
        })
    }

    /// Autocast to bf16 on the CPU: the weights and activations stay f32, and every linear
    /// layer of the decoder blocks (q, k, v, o, gate, up, down) and the fused LM head of
    /// training compute their products in bf16 with f32 accumulation
    /// ([`super::bf16_linear::linear_bf16`]), and so do attention's two products (`Q·Kᵀ` and
    /// `P·V`, [`super::bf16_matmul`]). Elsewhere (norms, softmax, activations) the computation
    /// is unchanged f32.
    pub fn with_bf16_linears(mut self, on: bool) -> Self {
        self.bf16_linears = on;
        self
    }

    /// Whether the linear layers compute in bf16 (see [`Decoder::with_bf16_linears`]).
    pub fn bf16_linears(&self) -> bool {
        self.bf16_linears
    }

    /// Sends the gradients of the embedding (and, through [`Decoder::grad_sink`], of the
    /// head) to `sink` instead of candle's store when they are f32 CPU parameters: the
    /// training step's path, which sums them in place ([`GradSink`]).
    pub fn with_grad_sink(mut self, sink: GradSink) -> Self {
        self.grad_sink = Some(sink);
        self
    }

    pub fn grad_sink(&self) -> Option<&GradSink> {
        self.grad_sink.as_ref()
    }

    /// The output projection of hidden states, in bf16 too under autocast. `step`: from
    /// `forward_step` (inference only, may use the packed weights).
    fn head_linear(&self, hidden: &Tensor, step: bool) -> Result<Tensor> {
        self.project(hidden, &self.head, None, &self.head_packed, step)
    }

    fn linear(&self, x: &Tensor, p: &Proj, step: bool) -> Result<Tensor> {
        self.project(x, &p.weight, p.bias.as_ref(), &p.packed, step)
    }

    fn project(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        packed: &OnceLock<PackedB>,
        step: bool,
    ) -> Result<Tensor> {
        if !self.bf16_linears {
            return ops::linear(x, weight, bias);
        }
        if step && x.device().is_cpu() && weight.dtype() == DType::F32 {
            return prepacked_linear(x, weight, bias, packed);
        }
        bf16_linear::linear_bf16(x, weight, bias)
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The parameters by HF name (tied weights appear once).
    pub fn params(&self) -> &BTreeMap<String, Tensor> {
        &self.params
    }

    pub fn dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }

    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    /// The output projection: [V, H] for a causal LM, [num_labels, H] for a classifier.
    pub fn head_weight(&self) -> &Tensor {
        &self.head
    }

    fn check_ids(&self, input_ids: &Tensor) -> Result<()> {
        let max = input_ids
            .max_all()?
            .to_dtype(DType::U32)?
            .to_scalar::<u32>()?;
        self.check_max_id(Some(max))
    }

    fn check_max_id(&self, max: Option<u32>) -> Result<()> {
        let max = max.unwrap_or(0) as usize;
        if max >= self.config.vocab_size {
            return Err(Error::invalid(format!(
                "token id {max} is outside the model's vocabulary of {} entries",
                self.config.vocab_size
            )));
        }
        Ok(())
    }

    fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let flat = input_ids.flatten_all()?;
        if crate::device::own_kernels_for(&self.embed_tokens, Kernels::Embedding) {
            // On a GPU: a backward that is parallel and deterministic (see embedding_gpu). The
            // ids come to the host once, to check them and to group positions by token.
            let host = flat.to_dtype(DType::U32)?.to_vec1::<u32>()?;
            self.check_max_id(host.iter().max().copied())?;
            let rows = embedding_gpu::embedding(&self.embed_tokens, &flat, &host)?;
            return Ok(rows.reshape((b, t, self.config.hidden_size))?);
        }
        self.check_ids(input_ids)?;
        Ok(
            grad_sink::embedding(&self.embed_tokens, &flat, self.grad_sink.as_ref())?.reshape((
                b,
                t,
                self.config.hidden_size,
            ))?,
        )
    }

    /// Final-norm hidden states for a whole sequence, [B, T, H].
    ///
    /// `attention_mask` ([B, T], 1 = real token, 0 = padding) hides padded keys; position ids
    /// are `0..T` for every row, as transformers uses when called without explicit positions
    /// (right padding keeps real tokens at their true positions).
    pub fn forward_hidden(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        // One hand-off to rayon's pool per pass, not one per op (see `crate::pool`).
        crate::pool::on_pool(|| self.forward_hidden_here(input_ids, attention_mask))
    }

    fn forward_hidden_here(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        if t > self.config.max_position_embeddings {
            return Err(Error::invalid(format!(
                "sequence of {t} tokens exceeds max_position_embeddings = {}",
                self.config.max_position_embeddings
            )));
        }
        let device = input_ids.device();
        let dtype = self.dtype();
        let positions: Vec<Vec<u32>> = vec![(0..t as u32).collect(); b];
        let (cos, sin) = self.rope.cos_sin(&positions, dtype, device)?;
        let key_valid: Vec<Vec<bool>> = match attention_mask {
            Some(m) => m
                .to_dtype(DType::U32)?
                .to_vec2::<u32>()?
                .into_iter()
                .map(|row| row.into_iter().map(|x| x != 0).collect())
                .collect(),
            None => vec![vec![true; t]; b],
        };
        let mask = additive_mask(&key_valid, t, 0, dtype, device)?;
        let mut x = self.embed(input_ids)?;
        for layer in &self.layers {
            let normed = fused::rms_norm(&x, &layer.input_norm, self.config.rms_norm_eps)?;
            let fuse =
                self.bf16_linears && normed.elem_count() > 0 && fused::cpu_f32(&[&normed, &mask]);
            let fused = if fuse {
                self.attention_bf16(&layer.attention, &normed, (&cos, &sin), &mask)?
            } else {
                None
            };
            let attn = match fused {
                Some(attn) => attn,
                None => {
                    let (q, k, v) = self.qkv(&layer.attention, &normed, &cos, &sin, false)?;
                    self.attend(&q, &k, &v, &mask, false)?
                }
            };
            x = (x + self.linear(&attn, &layer.attention.o, false)?)?;
            let normed = fused::rms_norm(&x, &layer.post_attention_norm, self.config.rms_norm_eps)?;
            x = (x + self.mlp(&layer.mlp, &normed, false)?)?;
        }
        fused::rms_norm(&x, &self.norm, self.config.rms_norm_eps)
    }

    /// Logits for a whole sequence, [B, T, V] (or [B, T, num_labels] for a classifier).
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let hidden = self.forward_hidden(input_ids, attention_mask)?;
        self.head_linear(&hidden, false)
    }

    /// The head's outputs at the last token of each sequence (next-token logits for a causal LM,
    /// scores for a classifier), `batch_size` sequences per right-padded forward pass.
    /// `pad_id` fills the padding (masked, so its value never matters). Empty sequences are an
    /// error.
    pub fn last_token_outputs(
        &self,
        sequences: &[Vec<u32>],
        pad_id: u32,
        batch_size: usize,
    ) -> Result<Vec<Vec<f32>>> {
        let device = self.device().clone();
        let mut out = Vec::with_capacity(sequences.len());
        for chunk in sequences.chunks(batch_size.max(1)) {
            if chunk.iter().any(|s| s.is_empty()) {
                return Err(Error::invalid(
                    "cannot read the last token of an empty sequence",
                ));
            }
            let width = chunk.iter().map(|s| s.len()).max().unwrap_or(1);
            let mut ids = Vec::with_capacity(chunk.len() * width);
            let mut mask = Vec::with_capacity(chunk.len() * width);
            for s in chunk {
                ids.extend_from_slice(s);
                ids.extend(std::iter::repeat_n(pad_id, width - s.len()));
                mask.extend(std::iter::repeat_n(1u32, s.len()));
                mask.extend(std::iter::repeat_n(0u32, width - s.len()));
            }
            let input = Tensor::from_vec(ids, (chunk.len(), width), &device)?;
            let mask = Tensor::from_vec(mask, (chunk.len(), width), &device)?;
            let hidden = self.forward_hidden(&input, Some(&mask))?;
            let lengths: Vec<usize> = chunk.iter().map(|s| s.len()).collect();
            let last = gather_last_token(&hidden, &lengths)?;
            let outputs = self.head_linear(&last, false)?;
            out.extend(outputs.to_dtype(DType::F32)?.to_vec2::<f32>()?);
        }
        Ok(out)
    }

    /// Runs new tokens `input_ids` [B, T] against `cache` and appends their keys and values.
    ///
    /// `step_mask` ([B][T]) marks real tokens; a 0 marks padding (e.g. left padding of a
    /// shorter prompt in the prefill), which no later token attends to and which does not
    /// advance that row's position. Each row's positions continue from the cache's count.
    pub fn forward_step(
        &self,
        input_ids: &Tensor,
        step_mask: Option<&[Vec<bool>]>,
        cache: &mut KvCache,
        logits_at: LogitsAt,
    ) -> Result<Tensor> {
        // One hand-off to rayon's pool per step, not one per op (see `crate::pool`).
        crate::pool::on_pool(|| self.forward_step_here(input_ids, step_mask, cache, logits_at))
    }

    fn forward_step_here(
        &self,
        input_ids: &Tensor,
        step_mask: Option<&[Vec<bool>]>,
        cache: &mut KvCache,
        logits_at: LogitsAt,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        if cache.batch_size() != b {
            return Err(Error::invalid(format!(
                "KV cache holds {} rows but the step has {b}",
                cache.batch_size()
            )));
        }
        let device = input_ids.device();
        let dtype = self.dtype();
        let all_real;
        let step_mask = match step_mask {
            Some(m) => m,
            None => {
                all_real = vec![vec![true; t]; b];
                &all_real
            }
        };
        let positions = cache.next_positions(step_mask);
        if let Some(&max) = positions.iter().flatten().max() {
            if max as usize >= self.config.max_position_embeddings {
                return Err(Error::invalid(format!(
                    "position {max} exceeds max_position_embeddings = {}",
                    self.config.max_position_embeddings
                )));
            }
        }
        let (cos, sin) = self.rope.cos_sin(&positions, dtype, device)?;
        let past = cache.len();
        cache.reserve(past + t, dtype, device)?;
        cache.push_validity(step_mask);
        let mask = additive_mask(cache.key_valid(), t, past, dtype, device)?;
        let mut x = self.embed(input_ids)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let normed = ops::fast::rms_norm(&x, &layer.input_norm, self.config.rms_norm_eps)?;
            let (q, k, v) = self.qkv(&layer.attention, &normed, &cos, &sin, true)?;
            let (k_all, v_all) = cache.append(i, &k, &v, past)?;
            let attn = self.attend(&q, &k_all, &v_all, &mask, true)?;
            x = (x + self.linear(&attn, &layer.attention.o, true)?)?;
            let normed =
                ops::fast::rms_norm(&x, &layer.post_attention_norm, self.config.rms_norm_eps)?;
            x = (x + self.mlp(&layer.mlp, &normed, true)?)?;
        }
        cache.advance(t, step_mask);
        let x = match logits_at {
            LogitsAt::Last => x.narrow(1, t - 1, 1)?,
            LogitsAt::All => x,
        };
        let hidden = ops::fast::rms_norm(&x, &self.norm, self.config.rms_norm_eps)?;
        let logits = self.head_linear(&hidden, true)?;
        Ok(match logits_at {
            LogitsAt::Last => logits.squeeze(1)?,
            LogitsAt::All => logits,
        })
    }

    /// q, k, v projected, split into heads and rotated: q [B, H, T, D], k/v [B, KV, T, D].
    fn qkv(
        &self,
        a: &Attention,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        step: bool,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        if step
            && !self.bf16_linears
            && crate::device::own_cuda_kernels(x.device(), Kernels::Decode)
        {
            if let Some((w, bias)) = a.joint()? {
                return self.qkv_joint(x, w, bias.as_ref(), cos, sin);
            }
        }
        let (b, t, _) = x.dims3()?;
        let c = &self.config;
        let heads = |p: &Proj, n: usize| -> Result<Tensor> {
            Ok(self
                .linear(x, p, step)?
                .reshape((b, t, n, c.head_dim))?
                .transpose(1, 2)?)
        };
        // The fused rotary reads the transposed heads in place; its output is contiguous.
        let q = fused_rope::apply_rotary(&heads(&a.q, c.num_attention_heads)?, cos, sin)?;
        let k = fused_rope::apply_rotary(&heads(&a.k, c.num_key_value_heads)?, cos, sin)?;
        let v = heads(&a.v, c.num_key_value_heads)?.contiguous()?;
        Ok((q, k, v))
    }

    /// [`Decoder::qkv`] as one product on the joint weights, the heads read as views of its
    /// output: a decoding step on a GPU is a few rows per product, so its time is the launches
    /// (one product and one bias add here, where three of each were).
    fn qkv_joint(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t, _) = x.dims3()?;
        let c = &self.config;
        let (h, kv) = (c.num_attention_heads, c.num_key_value_heads);
        let y = ops::linear(x, weight, bias)?.reshape((b, t, h + 2 * kv, c.head_dim))?;
        let heads = |first: usize, n: usize| -> Result<Tensor> {
            Ok(y.narrow(2, first, n)?.transpose(1, 2)?)
        };
        let q = fused_rope::apply_rotary(&heads(0, h)?, cos, sin)?;
        let k = fused_rope::apply_rotary(&heads(h, kv)?, cos, sin)?;
        let v = heads(h + kv, kv)?.contiguous()?;
        Ok((q, k, v))
    }

    /// [`Decoder::qkv`] and [`Decoder::attend`] under bf16 autocast on the CPU, in the
    /// fewest graph nodes: one product for the three projections (their weights and biases
    /// concatenated, so x is packed once and its gradient is one product), then the rotary
    /// and attention as one op ([`fused_attention`]) whose output is already in the layout of
    /// the output projection's input. `None` where only some projections have a bias.
    fn attention_bf16(
        &self,
        a: &Attention,
        x: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        mask: &Tensor,
    ) -> Result<Option<Tensor>> {
        let c = &self.config;
        // Concatenated afresh in the graph each pass: training needs the weights' gradients.
        let Some((weight, bias)) = a.concatenated()? else {
            return Ok(None);
        };
        let qkv = bf16_linear::linear_bf16(x, &weight, bias.as_ref())?;
        let heads = (c.num_attention_heads, c.num_key_value_heads);
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        let out = fused_attention::qkv_attention_bf16(&qkv, heads, (cos, sin), mask, scale)?;
        Ok(Some(out))
    }

    /// Scaled dot-product attention with grouped KV heads. Query heads are folded into the KV
    /// head they share ([B, KV, groups·T, D]) so keys and values are never repeated in memory;
    /// query head h reads KV head h / groups, as transformers' `repeat_kv` arranges it. Under
    /// bf16 autocast the two products (`Q·Kᵀ`, `P·V`) are bf16 with f32 accumulation too, as
    /// PyTorch's autocast runs `bmm`; the softmax stays f32.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
        fused: bool,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, h, t, d) = q.dims4()?;
        let kv = c.num_key_value_heads;
        let groups = h / kv;
        let s = k.dim(2)?;
        let scale = 1.0 / (d as f64).sqrt();
        if !fused
            && crate::device::own_cuda_kernels(q.device(), Kernels::Attention)
            && attention_gpu::fits(q, k, v, mask)
        {
            // Training on a GPU: no [B, H, T, S] tensor kept per layer for the backward.
            // The whole-sequence pass's mask is causal (`forward_hidden`).
            let out = attention_gpu::attention(q, k, v, mask, scale, true)?;
            return Ok(out.transpose(1, 2)?.reshape((b, t, h * d))?);
        }
        let q = q.contiguous()?.reshape((b, kv, groups * t, d))?;
        let bf16 = self.bf16_linears;
        let scores = if bf16 {
            bf16_matmul::matmul_bf16_nt(&q, k)?
        } else {
            q.matmul(&k.t()?)?
        };
        let scores = scores.reshape((b, h, t, s))?;
        let probs = if fused && crate::device::own_cuda_kernels(scores.device(), Kernels::Decode) {
            // A decoding step on a GPU: scale, mask and softmax in one kernel, not three.
            fused_softmax::masked_softmax_values(&scores, mask, scale)?
        } else if fused {
            ops::fast::softmax_last_dim(&(scores * scale)?.broadcast_add(mask)?)?
        } else {
            // Scale, mask and softmax in one differentiable kernel (composed off the CPU).
            fused_softmax::masked_softmax(&scores, mask, scale, bf16)?
        };
        let probs = probs.reshape((b, kv, groups * t, s))?;
        let out = if bf16 {
            bf16_matmul::matmul_bf16(&probs, v)?
        } else {
            probs.matmul(v)?
        };
        Ok(out
            .reshape((b, h, t, d))?
            .transpose(1, 2)?
            .reshape((b, t, h * d))?)
    }

    fn mlp(&self, m: &Mlp, x: &Tensor, step: bool) -> Result<Tensor> {
        let (wg, wu) = (&m.gate.weight, &m.up.weight);
        let unbiased = m.gate.bias.is_none() && m.up.bias.is_none();
        if self.bf16_linears && !step && unbiased && fused::cpu_f32(&[x, wg, wu]) {
            // Training and whole-sequence passes: gate, up and SwiGLU as one op.
            let act = fused_mlp::gated_mlp_bf16(x, wg, wu)?;
            return self.linear(&act, &m.down, step);
        }
        let gate = self.linear(x, &m.gate, step)?;
        let up = self.linear(x, &m.up, step)?;
        let act = fused_swiglu::swiglu(&gate, &up, self.bf16_linears)?;
        self.linear(&act, &m.down, step)
    }
}

/// `x @ weightᵀ (+ bias)` in bf16 with f32 accumulation against the weight's panels in
/// `packed` (packed on first use). Inference only: no gradient reaches the weight.
fn prepacked_linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    packed: &OnceLock<PackedB>,
) -> Result<Tensor> {
    let (outputs, inputs) = weight.dims2()?;
    let threads = candle_core::utils::get_num_threads();
    let panels = match packed.get() {
        Some(p) => p,
        None => {
            let w = weight.flatten_all()?.to_vec1::<f32>()?;
            let b = Operand::DepthInner {
                data: &w,
                ld: inputs,
            };
            // Two racing threads pack the same values; either result serves.
            let _ = packed.set(PackedB::new(b, (outputs, inputs), threads));
            packed.get().expect("just set")
        }
    };
    let mut dims = x.dims().to_vec();
    let rows = x.elem_count() / inputs.max(1);
    let xs = x.flatten_all()?.to_vec1::<f32>()?;
    let mut y = vec![0f32; rows * outputs];
    let a = Operand::DepthInner {
        data: &xs,
        ld: inputs,
    };
    bf16_gemm::matmul_packed(rows, a, panels, &mut y, false, threads);
    let y = Tensor::from_vec(y, (rows, outputs), x.device())?;
    let y = match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    *dims.last_mut().expect("rank >= 1") = outputs;
    Ok(y.reshape(dims)?)
}

/// Additive attention bias [B, 1, T, S] for `T` queries at cache slots `past..past+T` over all
/// `S = past + T` keys: a key is visible when it is a real token and not in the future.
fn additive_mask(
    key_valid: &[Vec<bool>],
    t: usize,
    past: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    // Small masks (a decoding step's B · S) cost the host nothing and one upload; building them
    // on the device would be five small kernels.
    let values = key_valid.len() * t * (past + t);
    if device.is_cpu() || values <= 1 << 20 {
        additive_mask_on_host(key_valid, t, past, dtype, device)
    } else {
        additive_mask_on_device(key_valid, t, past, dtype, device)
    }
}

/// [`additive_mask`] built on `device` from the keys' flags: the host uploads B·S bytes instead
/// of B·T·S floats it wrote one by one (at batch 8 × 2048² that was 134 MB and tens of
/// milliseconds per pass with the GPU waiting). The same values: 0 or [`MASKED`].
fn additive_mask_on_device(
    key_valid: &[Vec<bool>],
    t: usize,
    past: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let b = key_valid.len();
    let s = past + t;
    let mut flags = Vec::with_capacity(b * s);
    for row in key_valid {
        if row.len() < s {
            return Err(Error::invalid(format!(
                "attention mask: {} key flags for {s} keys",
                row.len()
            )));
        }
        flags.extend(row[..s].iter().map(|&valid| u8::from(valid)));
    }
    let real = Tensor::from_vec(flags, (b, 1, 1, s), device)?;
    let query_slot = Tensor::arange(past as u32, s as u32, device)?.reshape((1, 1, t, 1))?;
    let key_slot = Tensor::arange(0u32, s as u32, device)?.reshape((1, 1, 1, s))?;
    let visible = key_slot.broadcast_le(&query_slot)?.broadcast_mul(&real)?;
    // visible · (−MASKED) + MASKED: exactly 0 for a visible key (−MASKED and MASKED cancel) and
    // MASKED for a hidden one.
    let bias = visible
        .to_dtype(DType::F32)?
        .affine(-f64::from(MASKED), f64::from(MASKED))?;
    Ok(bias.to_dtype(dtype)?)
}

fn additive_mask_on_host(
    key_valid: &[Vec<bool>],
    t: usize,
    past: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let b = key_valid.len();
    let s = past + t;
    let mut data = Vec::with_capacity(b * t * s);
    for row in key_valid {
        for i in 0..t {
            for (j, &valid) in row.iter().enumerate().take(s) {
                data.push(if valid && j <= past + i { 0f32 } else { MASKED });
            }
        }
    }
    Ok(Tensor::from_vec(data, (b, 1, t, s), device)?.to_dtype(dtype)?)
}

/// Picks each row's value at its last real token: `hidden` [B, T, X], `attention_mask` [B][T].
/// Used by sequence-classification heads (reward models read the last non-pad token).
pub fn gather_last_token(values: &Tensor, lengths: &[usize]) -> Result<Tensor> {
    let (b, t, _) = values.dims3()?;
    let index: Vec<u32> = lengths
        .iter()
        .enumerate()
        .map(|(row, &len)| (row * t + len.max(1) - 1) as u32)
        .collect();
    let index = Tensor::from_vec(index, b, values.device())?;
    Ok(values.flatten_to(1)?.index_select(&index, 0)?)
}

#[cfg(test)]
mod tests {
    use super::super::test_tensors::{max_abs_diff, random};
    use super::*;

    /// A decoding step's joint q/k/v product gives the three projections' heads, rotated,
    /// biases included (Qwen2's, random here).
    #[test]
    fn the_joint_projection_gives_the_three_projections() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/bench/configs/tiny.json");
        let config = ModelConfig::from_file(&path).unwrap();
        let mut params =
            super::super::init::random_params(&config, 3, DType::F32, &Device::Cpu).unwrap();
        for (i, (name, t)) in params.iter_mut().enumerate() {
            if name.ends_with("_proj.bias") {
                *t = random(t.dims(), 100 + i as u64, 0.5);
            }
        }
        let decoder = Decoder::from_params(config.clone(), params).unwrap();
        let (b, t) = (2, 5);
        let x = random(&[b, t, config.hidden_size], 9, 1.0);
        let positions = vec![(3..3 + t as u32).collect::<Vec<_>>(); b];
        let (cos, sin) = decoder
            .rope
            .cos_sin(&positions, DType::F32, &Device::Cpu)
            .unwrap();
        let a = &decoder.layers[1].attention;
        let apart = decoder.qkv(a, &x, &cos, &sin, false).unwrap();
        let (w, bias) = a.joint().unwrap().unwrap();
        assert!(bias.is_some());
        let joint = decoder.qkv_joint(&x, w, bias.as_ref(), &cos, &sin).unwrap();
        for (one, other) in [
            (&apart.0, &joint.0),
            (&apart.1, &joint.1),
            (&apart.2, &joint.2),
        ] {
            assert_eq!(one.dims(), other.dims());
            assert!(max_abs_diff(one, other) < 1e-5);
        }
        assert!(joint.2.is_contiguous());
    }

    /// The mask a GPU builds from the keys' flags holds the host's values, bit for bit: causal
    /// over a cache with past keys, padded keys hidden, a row with no real key.
    #[test]
    fn masks_built_on_the_device_equal_the_hosts() {
        let dev = Device::Cpu;
        let keys = vec![
            vec![true; 7],
            vec![false, false, true, true, true, true, true],
            vec![false; 7],
        ];
        for (t, past) in [(7, 0), (3, 4), (1, 6)] {
            for dtype in [DType::F32, DType::BF16] {
                let host = additive_mask_on_host(&keys, t, past, dtype, &dev).unwrap();
                let device = additive_mask_on_device(&keys, t, past, dtype, &dev).unwrap();
                assert_eq!(device.dims(), host.dims());
                assert_eq!(device.dtype(), dtype);
                let bits = |m: &Tensor| -> Vec<u32> {
                    let v = m.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
                    v.to_vec1::<f32>()
                        .unwrap()
                        .iter()
                        .map(|x| x.to_bits())
                        .collect()
                };
                assert_eq!(bits(&device), bits(&host), "t {t}, past {past}, {dtype:?}");
            }
        }
        assert!(additive_mask_on_device(&[vec![true; 3]], 2, 2, DType::F32, &dev).is_err());
    }
}
