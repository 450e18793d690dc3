//! Model-core benchmark: f32 matmul throughput (the reference ceiling), AdamW
//! training steps with estimated MFU, and generation with and without the KV
//! cache, on the `tiny` and `small` presets. Prints one JSON object per line.
//!
//! Run: `cargo bench -p troupe-model --bench model_core -- [--steps N] [--export DIR]`.
//! `--export DIR` also writes the tiny model to DIR in Hugging Face layout and
//! prints its first logits on tokens 0..32, to compare with the PyTorch peer.

use candle_core::{DType, Device, Tensor};
use std::time::Instant;
use troupe_model::sample::generate_tokens;
use troupe_model::{
    clip_grad_norm, lm_loss, AdamW, AdamWConfig, Config, GenerateOptions, Heads, Model,
    SamplingParams,
};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

struct Args {
    steps: usize,
    export: Option<std::path::PathBuf>,
    /// Runs only this preset (`tiny` or `small`) when set.
    only: Option<String>,
    /// Skips the generation benchmarks.
    train_only: bool,
}

fn parse_args() -> Args {
    let mut args = Args {
        steps: 10,
        export: None,
        only: None,
        train_only: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--steps" => args.steps = it.next().and_then(|v| v.parse().ok()).unwrap_or(args.steps),
            "--export" => args.export = it.next().map(Into::into),
            "--only" => args.only = it.next(),
            "--train-only" => args.train_only = true,
            // cargo bench passes `--bench`; anything else is ignored too.
            _ => {}
        }
    }
    args
}

/// Best-of-`repeats` f32 matmul throughput in GFLOP/s for `(m, k) x (k, n)`.
fn matmul_gflops(m: usize, k: usize, n: usize, repeats: usize) -> Result<f64> {
    let device = Device::Cpu;
    let a = Tensor::randn(0f32, 1.0, (m, k), &device)?;
    let b = Tensor::randn(0f32, 1.0, (k, n), &device)?;
    a.matmul(&b)?;
    let mut best = f64::MAX;
    for _ in 0..repeats {
        let start = Instant::now();
        let c = a.matmul(&b)?;
        c.sum_all()?.to_scalar::<f32>()?;
        best = best.min(start.elapsed().as_secs_f64());
    }
    Ok(2.0 * (m * k * n) as f64 / best / 1e9)
}

/// Mean seconds per phase of one training step.
#[derive(Default)]
struct StepTimes {
    forward: f64,
    backward: f64,
    optimizer: f64,
}

fn train_bench(
    cfg: &Config,
    batch: usize,
    seq: usize,
    steps: usize,
    peak_gflops: f64,
) -> Result<()> {
    let device = Device::Cpu;
    let model = Model::new_random(cfg, Heads::default(), 0, DType::F32, &device)?;
    let mut optimizer = AdamW::new(
        model.named_vars(),
        AdamWConfig {
            learning_rate: 1e-4,
            weight_decay: 0.1,
            ..Default::default()
        },
    )?;
    let ids =
        Tensor::rand(0f32, cfg.vocab_size as f32, (batch, seq), &device)?.to_dtype(DType::U32)?;
    let vars = model.vars();

    // The first `warmup` steps are left out of the timing.
    let mut times = StepTimes::default();
    let warmup = 3;
    let mut loss_value = 0.0;
    let mut timed_start = Instant::now();
    for step in 0..warmup + steps {
        if step == warmup {
            times = StepTimes::default();
            timed_start = Instant::now();
        }

        let t0 = Instant::now();
        let logits = model.forward(&ids, None)?;
        let loss = lm_loss(&logits, &ids, None)?;

        let t1 = Instant::now();
        let mut grads = loss.backward()?;

        let t2 = Instant::now();
        clip_grad_norm(&mut grads, &vars, 1.0)?;
        optimizer.step(&grads)?;

        let t3 = Instant::now();
        loss_value = loss.to_scalar::<f32>()?;
        times.forward += (t1 - t0).as_secs_f64();
        times.backward += (t2 - t1).as_secs_f64();
        times.optimizer += (t3 - t2).as_secs_f64();
    }

    let step_s = timed_start.elapsed().as_secs_f64() / steps as f64;
    let tokens_per_s = (batch * seq) as f64 / step_s;
    let n = model.num_parameters() as f64;
    let flops_6n = 6.0 * n * tokens_per_s;
    println!(
        "{}",
        serde_json::json!({
            "bench": "train", "params": model.num_parameters(), "batch": batch, "seq": seq, "steps": steps,
            "train_step_s": step_s, "train_tokens_per_s": tokens_per_s,
            "train_flops_per_s_6N": flops_6n, "mfu_vs_matmul_peak": flops_6n / (peak_gflops * 1e9),
            "forward_s": times.forward / steps as f64, "backward_s": times.backward / steps as f64,
            "clip_and_adamw_s": times.optimizer / steps as f64, "final_loss": loss_value,
        })
    );
    Ok(())
}

fn generate_bench(
    cfg: &Config,
    batch: usize,
    new_tokens: usize,
    use_kv_cache: bool,
) -> Result<f64> {
    let device = Device::Cpu;
    let model = Model::new_random(cfg, Heads::default(), 0, DType::F32, &device)?;
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|i| {
            (0..16)
                .map(|j| ((i * 31 + j * 7) % cfg.vocab_size) as u32)
                .collect()
        })
        .collect();
    let params: Vec<SamplingParams> = (0..batch)
        .map(|i| SamplingParams {
            temperature: 1.0,
            max_new_tokens: new_tokens,
            seed: i as u64,
            ..Default::default()
        })
        .collect();
    let options = GenerateOptions { use_kv_cache };
    // Warm up, then time; no EOS so every row produces `new_tokens` tokens.
    generate_tokens(&model, &prompts, &params, None, 0, &options)?;
    let start = Instant::now();
    let out = generate_tokens(&model, &prompts, &params, None, 0, &options)?;
    let elapsed = start.elapsed().as_secs_f64();
    let tokens: usize = out.iter().map(|g| g.tokens.len()).sum();
    Ok(tokens as f64 / elapsed)
}

fn export_tiny(dir: &std::path::Path) -> Result<()> {
    let model = Model::new_random(
        &Config::tiny(),
        Heads::default(),
        0,
        DType::F32,
        &Device::Cpu,
    )?;
    model.write_hf_dir(dir, None)?;
    let ids = Tensor::arange(0u32, 32, &Device::Cpu)?.unsqueeze(0)?;
    let logits = model.forward(&ids, None)?;
    let first8: Vec<f32> = logits.get(0)?.get(31)?.narrow(0, 0, 8)?.to_vec1()?;
    println!(
        "{}",
        serde_json::json!({"bench": "export", "dir": dir, "last_logits_first8": first8})
    );
    Ok(())
}

fn main() -> Result<()> {
    // Before any tensor op, so candle's thread pool is sized by it.
    troupe_model::tune_cpu_runtime();
    let args = parse_args();
    let threads = rayon::current_num_threads();
    let peak = [(1024, 1024, 1024), (2048, 384, 1152), (1024, 128, 2048)]
        .iter()
        .map(|&(m, k, n)| matmul_gflops(m, k, n, 5))
        .collect::<Result<Vec<_>>>()?;
    let best_peak = peak.iter().cloned().fold(0.0, f64::max);
    println!(
        "{}",
        serde_json::json!({"bench": "matmul_f32", "threads": threads,
            "gflops_1024x1024x1024": peak[0], "gflops_2048x384x1152": peak[1], "gflops_1024x128x2048": peak[2]})
    );

    if let Some(dir) = &args.export {
        export_tiny(dir)?;
    }
    for (name, cfg, seq) in [
        ("tiny", Config::tiny(), 128),
        ("small", Config::small(), 256),
    ] {
        if args.only.as_deref().is_some_and(|only| only != name) {
            continue;
        }
        println!("{}", serde_json::json!({"bench": "preset", "name": name}));
        train_bench(&cfg, 8, seq, args.steps, best_peak)?;
        if args.train_only {
            continue;
        }
        let mut generation = serde_json::Map::new();
        for batch in [1, 8] {
            for cache in [true, false] {
                let key = format!(
                    "batch{batch}_{}_tokens_per_s",
                    if cache { "kv_cache" } else { "no_cache" }
                );
                generation.insert(key, generate_bench(&cfg, batch, 64, cache)?.into());
            }
        }
        println!(
            "{}",
            serde_json::json!({"bench": "generate", "name": name, "new_tokens": 64, "prompt_tokens": 16, "results": generation})
        );
    }
    Ok(())
}
