//! Prints the metadata (arrays abbreviated) and tensor types of a GGUF file.
//!
//! `cargo run -p troupe-convert --example gguf_info -- FILE.gguf`

use candle_core::quantized::gguf_file::{Content, Value};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .ok_or("usage: gguf_info FILE.gguf")?;
    let mut file = std::fs::File::open(&path)?;
    let content = Content::read(&mut file)?;
    println!("version: {:?}", content.magic);
    let mut keys: Vec<_> = content.metadata.iter().collect();
    keys.sort_by(|a, b| a.0.cmp(b.0));
    for (key, value) in keys {
        match value {
            Value::Array(items) => println!(
                "{key}: array of {} (first: {:?})",
                items.len(),
                items.iter().take(4).collect::<Vec<_>>()
            ),
            Value::String(s) if s.len() > 200 => println!("{key}: string of {} bytes", s.len()),
            other => println!("{key}: {other:?}"),
        }
    }
    let mut tensors: Vec<_> = content.tensor_infos.iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(b.0));
    for (name, info) in tensors
        .iter()
        .filter(|(n, _)| !n.starts_with("blk.") || n.starts_with("blk.0."))
    {
        println!("{name}: {:?} {:?}", info.ggml_dtype, info.shape.dims());
    }
    println!("{} tensors", tensors.len());
    Ok(())
}
