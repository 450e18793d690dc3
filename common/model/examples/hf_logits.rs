//! Prints the first 8 logits at the last position of tokens 0..32 for a
//! Hugging Face model directory, to compare with transformers' output:
//! `cargo run -p troupe-model --example hf_logits -- DIR`.

use candle_core::{Device, Tensor};
use troupe_model::Model;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args().nth(1).ok_or("usage: hf_logits DIR")?;
    let (model, _) = Model::load_hf_dir(std::path::Path::new(&dir), &Device::Cpu)?;
    let ids = Tensor::arange(0u32, 32, &Device::Cpu)?.unsqueeze(0)?;
    let logits = model.forward(&ids, None)?;
    let first8: Vec<f32> = logits.get(0)?.get(31)?.narrow(0, 0, 8)?.to_vec1()?;
    println!("{first8:?}");
    Ok(())
}
