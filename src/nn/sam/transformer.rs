//! SAM's two-way transformer (`modeling/transformer.py`): tokens attend to the image embedding
//! and the image embedding attends back to the tokens.
use crate::nn::layers::{Activation, LayerNorm, Linear, MlpBlock, Params};
use tch::{Kind, Tensor};

/// Attention with an optional down-projection of q/k/v (`downsample_rate`).
#[derive(Debug)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    num_heads: i64,
}

impl Attention {
    pub fn new(p: &Params, embedding_dim: i64, num_heads: i64, downsample_rate: i64) -> Self {
        let internal = embedding_dim / downsample_rate;
        Attention {
            q_proj: Linear::new(&p.sub("q_proj"), embedding_dim, internal, true),
            k_proj: Linear::new(&p.sub("k_proj"), embedding_dim, internal, true),
            v_proj: Linear::new(&p.sub("v_proj"), embedding_dim, internal, true),
            out_proj: Linear::new(&p.sub("out_proj"), internal, embedding_dim, true),
            num_heads,
        }
    }

    fn separate_heads(&self, x: &Tensor) -> Tensor {
        let (b, n, c) = x.size3().expect("[B, N, C]");
        x.reshape([b, n, self.num_heads, c / self.num_heads]).transpose(1, 2)
    }

    fn recombine_heads(x: &Tensor) -> Tensor {
        let (b, h, n, c) = x.size4().expect("[B, heads, N, C]");
        x.transpose(1, 2).reshape([b, n, h * c])
    }

    pub fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        let q = self.separate_heads(&self.q_proj.forward(q));
        let k = self.separate_heads(&self.k_proj.forward(k));
        let v = self.separate_heads(&self.v_proj.forward(v));
        let c_per_head = q.size()[3];
        let attn = q.matmul(&k.permute([0, 1, 3, 2])) / (c_per_head as f64).sqrt();
        let attn = attn.softmax(-1, None::<Kind>);
        self.out_proj.forward(&Self::recombine_heads(&attn.matmul(&v)))
    }
}

#[derive(Debug)]
pub struct TwoWayAttentionBlock {
    pub self_attn: Attention,
    pub norm1: LayerNorm,
    pub cross_attn_token_to_image: Attention,
    pub norm2: LayerNorm,
    pub mlp: MlpBlock,
    pub norm3: LayerNorm,
    pub norm4: LayerNorm,
    pub cross_attn_image_to_token: Attention,
    skip_first_layer_pe: bool,
}

impl TwoWayAttentionBlock {
    fn new(p: &Params, dim: i64, num_heads: i64, mlp_dim: i64, downsample: i64, skip_first_layer_pe: bool) -> Self {
        TwoWayAttentionBlock {
            self_attn: Attention::new(&p.sub("self_attn"), dim, num_heads, 1),
            norm1: LayerNorm::new(&p.sub("norm1"), dim, 1e-5),
            cross_attn_token_to_image: Attention::new(&p.sub("cross_attn_token_to_image"), dim, num_heads, downsample),
            norm2: LayerNorm::new(&p.sub("norm2"), dim, 1e-5),
            mlp: MlpBlock::new(&p.sub("mlp"), dim, mlp_dim, Activation::Relu),
            norm3: LayerNorm::new(&p.sub("norm3"), dim, 1e-5),
            norm4: LayerNorm::new(&p.sub("norm4"), dim, 1e-5),
            cross_attn_image_to_token: Attention::new(&p.sub("cross_attn_image_to_token"), dim, num_heads, downsample),
            skip_first_layer_pe,
        }
    }

    fn forward(&self, queries: &Tensor, keys: &Tensor, query_pe: &Tensor, key_pe: &Tensor) -> (Tensor, Tensor) {
        let queries = if self.skip_first_layer_pe {
            self.self_attn.forward(queries, queries, queries)
        } else {
            let q = queries + query_pe;
            queries + self.self_attn.forward(&q, &q, queries)
        };
        let queries = self.norm1.forward(&queries);

        let q = &queries + query_pe;
        let k = keys + key_pe;
        let queries = self.norm2.forward(&(&queries + self.cross_attn_token_to_image.forward(&q, &k, keys)));

        let queries = self.norm3.forward(&(&queries + self.mlp.forward(&queries)));

        let q = &queries + query_pe;
        let k = keys + key_pe;
        let keys = self.norm4.forward(&(keys + self.cross_attn_image_to_token.forward(&k, &q, &queries)));
        (queries, keys)
    }
}

#[derive(Debug)]
pub struct TwoWayTransformer {
    pub layers: Vec<TwoWayAttentionBlock>,
    pub final_attn_token_to_image: Attention,
    pub norm_final_attn: LayerNorm,
}

impl TwoWayTransformer {
    pub fn new(p: &Params, depth: i64, dim: i64, num_heads: i64, mlp_dim: i64) -> Self {
        let downsample = 2;
        let layers = (0..depth).map(|i| TwoWayAttentionBlock::new(&p.sub("layers").sub(i), dim, num_heads, mlp_dim, downsample, i == 0)).collect();
        TwoWayTransformer {
            layers,
            final_attn_token_to_image: Attention::new(&p.sub("final_attn_token_to_image"), dim, num_heads, downsample),
            norm_final_attn: LayerNorm::new(&p.sub("norm_final_attn"), dim, 1e-5),
        }
    }

    /// image_embedding, image_pe: [B, C, h, w]; point_embedding: [B, N, C].
    /// Returns (processed tokens [B, N, C], processed image [B, h*w, C]).
    pub fn forward(&self, image_embedding: &Tensor, image_pe: &Tensor, point_embedding: &Tensor) -> (Tensor, Tensor) {
        let image_embedding = image_embedding.flatten(2, -1).permute([0, 2, 1]);
        let image_pe = image_pe.flatten(2, -1).permute([0, 2, 1]);
        let mut queries = point_embedding.shallow_clone();
        let mut keys = image_embedding;
        for layer in &self.layers {
            let (q, k) = layer.forward(&queries, &keys, point_embedding, &image_pe);
            queries = q;
            keys = k;
        }
        let q = &queries + point_embedding;
        let k = &keys + &image_pe;
        let attn_out = self.final_attn_token_to_image.forward(&q, &k, &keys);
        let queries = self.norm_final_attn.forward(&(queries + attn_out));
        (queries, keys)
    }
}
