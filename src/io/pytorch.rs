//! PyTorch checkpoint (.pth zip + pickle) reader, pure Rust.
