//! Loading tensors (PyTorch .pth, safetensors) into models.
