//! SAM's mask decoder (`modeling/mask_decoder.py`) in its per-class form (SAMed / SFR): the
//! decoder is built with `num_multimask_outputs = num_classes`, so it has `num_classes + 1` mask
//! tokens, and every token's mask is returned (token 0 = background, token c = class c) instead
//! of the official single-mask / multimask slice.
use crate::nn::layers::{Activation, ConvTranspose2d, InitRule, LayerNorm2d, Mlp, Params};
use super::transformer::TwoWayTransformer;
use super::config::SamConfig;
use crate::error::Result;
use tch::Tensor;

#[derive(Debug)]
pub struct MaskDecoder {
    pub transformer: TwoWayTransformer,
    pub iou_token: Tensor,
    pub mask_tokens: Tensor,
    /// `output_upscaling.{0,1,3}`: transposed conv, LayerNorm2d, (GELU), transposed conv, (GELU).
    pub output_upscaling: (ConvTranspose2d, LayerNorm2d, ConvTranspose2d),
    pub output_hypernetworks_mlps: Vec<Mlp>,
    pub iou_prediction_head: Mlp,
    num_mask_tokens: i64,
}

impl MaskDecoder {
    pub fn new(p: &Params, cfg: &SamConfig) -> Self {
        let c = cfg.prompt_embed_dim;
        let n = cfg.num_mask_tokens();
        let transformer = TwoWayTransformer::new(&p.sub("transformer"), cfg.decoder_depth, c, cfg.decoder_num_heads, cfg.decoder_mlp_dim);
        let iou_token = p.sub("iou_token").param("weight", &[1, c], InitRule::Normal(1.0));
        let mask_tokens = p.sub("mask_tokens").param("weight", &[n, c], InitRule::Normal(1.0));
        let up = p.sub("output_upscaling");
        let output_upscaling = (ConvTranspose2d::new(&up.sub(0), c, c / 4, 2), LayerNorm2d::new(&up.sub(1), c / 4), ConvTranspose2d::new(&up.sub(3), c / 4, c / 8, 2));
        let output_hypernetworks_mlps = (0..n).map(|i| Mlp::new(&p.sub("output_hypernetworks_mlps").sub(i), c, c, c / 8, 3)).collect();
        let iou_prediction_head = Mlp::new(&p.sub("iou_prediction_head"), c, cfg.iou_head_hidden_dim, n, cfg.iou_head_depth);
        MaskDecoder { transformer, iou_token, mask_tokens, output_upscaling, output_hypernetworks_mlps, iou_prediction_head, num_mask_tokens: n }
    }

    /// `predict_masks`: every mask token's logits [B, num_mask_tokens, 4h, 4w] and the IoU
    /// predictions [B, num_mask_tokens].
    ///
    /// The prompt batch must equal the image batch, or the image batch must be 1 (then the image
    /// is repeated for each prompt, as the official `repeat_interleave` does). `image_pe` is
    /// [1, C, h, w] and broadcasts over the batch.
    pub fn predict_masks(&self, image_embeddings: &Tensor, image_pe: &Tensor, sparse_prompt_embeddings: &Tensor, dense_prompt_embeddings: &Tensor) -> Result<(Tensor, Tensor)> {
        let bp = sparse_prompt_embeddings.size()[0];
        let bi = image_embeddings.size()[0];
        let output_tokens = Tensor::cat(&[&self.iou_token, &self.mask_tokens], 0);
        let output_tokens = output_tokens.unsqueeze(0).expand([bp, -1, -1], false);
        let tokens = Tensor::cat(&[&output_tokens, sparse_prompt_embeddings], 1);

        let src = if bi == bp {
            image_embeddings.shallow_clone()
        } else if bi == 1 {
            image_embeddings.repeat_interleave_self_int(bp, 0, None)
        } else {
            crate::bail!("mask decoder: {bi} image embeddings for {bp} prompt sets (expected equal counts, or one image)");
        };
        let src = src + dense_prompt_embeddings;
        let (b, c, h, w) = src.size4()?;

        let (hs, src) = self.transformer.forward(&src, image_pe, &tokens);
        let iou_token_out = hs.select(1, 0);
        let mask_tokens_out = hs.narrow(1, 1, self.num_mask_tokens);

        let src = src.transpose(1, 2).view([b, c, h, w]);
        let (up0, ln, up3) = &self.output_upscaling;
        let up = Activation::Gelu.apply(&ln.forward(&up0.forward(&src)));
        let upscaled = Activation::Gelu.apply(&up3.forward(&up));
        let hyper_in: Vec<Tensor> = self.output_hypernetworks_mlps.iter().enumerate().map(|(i, mlp)| mlp.forward(&mask_tokens_out.select(1, i as i64))).collect();
        let hyper_in = Tensor::stack(&hyper_in, 1);
        let (b, c, h, w) = upscaled.size4()?;
        let masks = hyper_in.matmul(&upscaled.view([b, c, h * w])).view([b, -1, h, w]);
        let iou_pred = self.iou_prediction_head.forward(&iou_token_out);
        Ok((masks, iou_pred))
    }
}
