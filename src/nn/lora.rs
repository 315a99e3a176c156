//! LoRA on the fused qkv projection of SAM image-encoder blocks.
