//! SAM's prompt encoder (`modeling/prompt_encoder.py`). Every tensor of the official module is
//! created (so checkpoints map one to one and the prompt encoder can be fine-tuned and saved),
//! but only the paths SFR uses are run: no prompt (an empty sparse embedding, the
//! `no_mask_embed` dense embedding) for pseudo-labelling, box prompts (LiteMedSAM's training
//! prompt, used to check it against the reference), and the random-Fourier positional
//! encoding of the image-embedding grid. Point and mask prompts are not implemented.
use crate::nn::layers::{Conv2d, InitRule, LayerNorm2d, Params};
use super::config::SamConfig;
use tch::{Kind, Tensor};

/// `PositionEmbeddingRandom`: a fixed Gaussian matrix (a buffer) mapping 2-D coordinates to
/// sin/cos features.
#[derive(Debug)]
pub struct PositionEmbeddingRandom {
    pub positional_encoding_gaussian_matrix: Tensor,
}

impl PositionEmbeddingRandom {
    fn new(p: &Params, num_pos_feats: i64) -> Self {
        PositionEmbeddingRandom { positional_encoding_gaussian_matrix: p.buffer("positional_encoding_gaussian_matrix", &[2, num_pos_feats], InitRule::Normal(1.0)) }
    }

    /// coords in [0, 1]², shape [..., 2] -> [..., 2 * num_pos_feats].
    fn pe_encoding(&self, coords: &Tensor) -> Tensor {
        let c = coords * 2.0 - 1.0;
        let c = c.matmul(&self.positional_encoding_gaussian_matrix);
        let c = c * (2.0 * std::f64::consts::PI);
        Tensor::cat(&[c.sin(), c.cos()], -1)
    }

    /// The encoding of every cell centre of an h×w grid: [C, h, w].
    pub fn forward(&self, h: i64, w: i64) -> Tensor {
        let g = &self.positional_encoding_gaussian_matrix;
        let grid = Tensor::ones([h, w], (Kind::Float, g.device()));
        let y_embed = (grid.cumsum(0, None::<Kind>) - 0.5) / h as f64;
        let x_embed = (grid.cumsum(1, None::<Kind>) - 0.5) / w as f64;
        let pe = self.pe_encoding(&Tensor::stack(&[x_embed, y_embed], -1).to_kind(g.kind()));
        pe.permute([2, 0, 1])
    }
}

#[derive(Debug)]
pub struct PromptEncoder {
    pub pe_layer: PositionEmbeddingRandom,
    /// pos/neg point and the two box corners (`point_embeddings.{0..3}.weight`).
    pub point_embeddings: Vec<Tensor>,
    pub not_a_point_embed: Tensor,
    /// `mask_downscaling.{0,1,3,4,6}`: conv, LayerNorm2d, (GELU), conv, LayerNorm2d, (GELU), conv.
    pub mask_downscaling: (Conv2d, LayerNorm2d, Conv2d, LayerNorm2d, Conv2d),
    pub no_mask_embed: Tensor,
    embed_dim: i64,
    image_embedding_size: (i64, i64),
    input_image_size: i64,
}

impl PromptEncoder {
    pub fn new(p: &Params, cfg: &SamConfig) -> Self {
        let c = cfg.prompt_embed_dim;
        let mic = cfg.mask_in_chans;
        let grid = cfg.grid_size();
        let pe_layer = PositionEmbeddingRandom::new(&p.sub("pe_layer"), c / 2);
        let point_embeddings = (0..4).map(|i| p.sub("point_embeddings").sub(i).param("weight", &[1, c], InitRule::Normal(1.0))).collect();
        let not_a_point_embed = p.sub("not_a_point_embed").param("weight", &[1, c], InitRule::Normal(1.0));
        let md = p.sub("mask_downscaling");
        let mask_downscaling = (
            Conv2d::new(&md.sub(0), 1, mic / 4, 2, 2, 0, true),
            LayerNorm2d::new(&md.sub(1), mic / 4),
            Conv2d::new(&md.sub(3), mic / 4, mic, 2, 2, 0, true),
            LayerNorm2d::new(&md.sub(4), mic),
            Conv2d::new(&md.sub(6), mic, c, 1, 1, 0, true),
        );
        let no_mask_embed = p.sub("no_mask_embed").param("weight", &[1, c], InitRule::Normal(1.0));
        PromptEncoder { pe_layer, point_embeddings, not_a_point_embed, mask_downscaling, no_mask_embed, embed_dim: c, image_embedding_size: (grid, grid), input_image_size: cfg.image_size }
    }

    /// `get_dense_pe()`: [1, C, h, w].
    pub fn get_dense_pe(&self) -> Tensor {
        self.pe_layer.forward(self.image_embedding_size.0, self.image_embedding_size.1).unsqueeze(0)
    }

    /// The embeddings of one box per image: boxes [B, 4] as (x0, y0, x1, y1) in input pixels
    /// -> sparse [B, 2, C] (the corners' encodings plus `point_embeddings.2` / `.3`) and the
    /// `no_mask_embed` dense embedding [B, C, h, w], as the official `_embed_boxes`.
    pub fn embed_boxes(&self, boxes: &Tensor) -> (Tensor, Tensor) {
        let w = &self.no_mask_embed;
        let b = boxes.size()[0];
        let coords = (boxes.to_kind(w.kind()).to_device(w.device()) + 0.5).reshape([-1, 2, 2]) / self.input_image_size as f64;
        let corners = self.pe_layer.pe_encoding(&coords);
        let corner_kind = Tensor::cat(&[&self.point_embeddings[2], &self.point_embeddings[3]], 0).unsqueeze(0);
        let sparse = corners + corner_kind;
        let (h, wd) = self.image_embedding_size;
        let dense = w.reshape([1, -1, 1, 1]).expand([b, -1, h, wd], false);
        (sparse, dense)
    }

    /// The embeddings of "no prompt" for a batch: sparse [B, 0, C] and dense [B, C, h, w]
    /// (`no_mask_embed` broadcast over the grid; an expanded view, not a copy).
    pub fn no_prompt(&self, batch: i64) -> (Tensor, Tensor) {
        let w = &self.no_mask_embed;
        let sparse = Tensor::empty([batch, 0, self.embed_dim], (w.kind(), w.device()));
        let (h, wd) = self.image_embedding_size;
        let dense = w.reshape([1, -1, 1, 1]).expand([batch, -1, h, wd], false);
        (sparse, dense)
    }
}
