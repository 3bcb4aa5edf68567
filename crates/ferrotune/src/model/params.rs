//! The list of a model's parameters: HF tensor names, shapes and what kind of tensor each is.
//! One list serves loading (which names must exist), initialisation, saving and the optimizer
//! (no weight decay on norms and biases).

use super::config::{Family, Head, ModelConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    Embedding,
    Matrix,
    Bias,
    Norm,
}

impl ParamKind {
    /// AdamW decays matrices and embeddings only, as TRL/transformers' default grouping does.
    pub fn decays(self) -> bool {
        matches!(self, ParamKind::Embedding | ParamKind::Matrix)
    }
}

#[derive(Debug, Clone)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub kind: ParamKind,
}

fn spec(name: String, shape: Vec<usize>, kind: ParamKind) -> ParamSpec {
    ParamSpec { name, shape, kind }
}

/// Every parameter of the model, in a stable order.
pub fn parameter_specs(c: &ModelConfig) -> Vec<ParamSpec> {
    let h = c.hidden_size;
    let q_out = c.num_attention_heads * c.head_dim;
    let kv_out = c.num_key_value_heads * c.head_dim;
    let mut specs = vec![spec(
        "model.embed_tokens.weight".into(),
        vec![c.vocab_size, h],
        ParamKind::Embedding,
    )];
    let qkv_bias = c.family == Family::Qwen2 || c.attention_bias;
    for i in 0..c.num_hidden_layers {
        let p = format!("model.layers.{i}");
        specs.push(spec(
            format!("{p}.input_layernorm.weight"),
            vec![h],
            ParamKind::Norm,
        ));
        for (name, out) in [("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)] {
            specs.push(spec(
                format!("{p}.self_attn.{name}.weight"),
                vec![out, h],
                ParamKind::Matrix,
            ));
            if qkv_bias {
                specs.push(spec(
                    format!("{p}.self_attn.{name}.bias"),
                    vec![out],
                    ParamKind::Bias,
                ));
            }
        }
        specs.push(spec(
            format!("{p}.self_attn.o_proj.weight"),
            vec![h, q_out],
            ParamKind::Matrix,
        ));
        // Llama's `attention_bias` also puts a bias on o_proj; Qwen2's never does.
        if c.family == Family::Llama && c.attention_bias {
            specs.push(spec(
                format!("{p}.self_attn.o_proj.bias"),
                vec![h],
                ParamKind::Bias,
            ));
        }
        specs.push(spec(
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            ParamKind::Norm,
        ));
        let i_size = c.intermediate_size;
        for (name, shape) in [
            ("gate_proj", vec![i_size, h]),
            ("up_proj", vec![i_size, h]),
            ("down_proj", vec![h, i_size]),
        ] {
            let out = shape[0];
            specs.push(spec(
                format!("{p}.mlp.{name}.weight"),
                shape,
                ParamKind::Matrix,
            ));
            if c.mlp_bias {
                specs.push(spec(
                    format!("{p}.mlp.{name}.bias"),
                    vec![out],
                    ParamKind::Bias,
                ));
            }
        }
    }
    specs.push(spec("model.norm.weight".into(), vec![h], ParamKind::Norm));
    match c.head {
        Head::CausalLm if !c.tie_word_embeddings => {
            specs.push(spec(
                "lm_head.weight".into(),
                vec![c.vocab_size, h],
                ParamKind::Matrix,
            ));
        }
        Head::CausalLm => {}
        Head::SequenceClassification => {
            specs.push(spec(
                "score.weight".into(),
                vec![c.num_labels, h],
                ParamKind::Matrix,
            ));
        }
    }
    specs
}

/// Parameter count as HF's `num_parameters()` reports it (tied weights counted once).
pub fn num_parameters(c: &ModelConfig) -> usize {
    parameter_specs(c)
        .iter()
        .map(|s| s.shape.iter().product::<usize>())
        .sum()
}

/// The parameters that take part in matrix products, as CONTRACTS' MFU counts them: every
/// projection and the output head (a tied embedding counts once, as the head), not the
/// embedding lookup, biases or norms.
pub fn matmul_parameters(c: &ModelConfig) -> usize {
    let tied_head = c.head == Head::CausalLm && c.tie_word_embeddings;
    parameter_specs(c)
        .iter()
        .filter(|s| s.kind == ParamKind::Matrix || (tied_head && s.kind == ParamKind::Embedding))
        .map(|s| s.shape.iter().product::<usize>())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn bench_config(shape: &str) -> ModelConfig {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(format!("../../scripts/bench/configs/{shape}.json"));
        ModelConfig::from_file(&path).unwrap()
    }

    /// Qwen2.5-0.5B's counts by hand: 24 layers of q (896²), k and v (2 · 128 · 896), o (896²)
    /// and the MLP (3 · 4864 · 896), plus the tied 151,936 × 896 head; HF's total adds the
    /// q/k/v biases (896 + 2 · 128) and two norms (2 · 896) per layer and the final norm.
    #[test]
    fn the_mfu_count_keeps_the_products_and_one_head() {
        let c = bench_config("qwen05");
        let per_layer = 896 * 896 + 2 * 128 * 896 + 896 * 896 + 3 * 4864 * 896;
        let head = 151_936 * 896;
        assert_eq!(matmul_parameters(&c), 24 * per_layer + head);
        let extras = 24 * ((896 + 2 * 128) + 2 * 896) + 896;
        assert_eq!(num_parameters(&c), 24 * per_layer + head + extras);
        assert_eq!(num_parameters(&c), 494_032_768);
        // An untied head is its own matrix, and the lookup table is still not a product.
        let mut untied = c.clone();
        untied.tie_word_embeddings = false;
        assert_eq!(matmul_parameters(&untied), matmul_parameters(&c));
        assert_eq!(num_parameters(&untied), num_parameters(&c) + head);
    }
}
