//! Splits one training step of a preset into parts and times each, forward and
//! backward, to show where the time goes.
//! Run: `cargo run --release -p troupe-model --example profile_step -- tiny|small`.
//! With a second argument `loop` it only runs training steps, for `perf record`.

use candle_core::{DType, Device, Tensor, Var};
use std::time::Instant;
use troupe_model::{lm_loss, Config, Heads, Model};

fn time<F: FnMut() -> candle_core::Result<()>>(label: &str, repeats: usize, mut f: F) {
    f().unwrap();
    let start = Instant::now();
    for _ in 0..repeats {
        f().unwrap();
    }
    println!(
        "{label:<40} {:>9.2} ms",
        start.elapsed().as_secs_f64() * 1e3 / repeats as f64
    );
}

fn main() {
    troupe_model::tune_cpu_runtime();
    let name = std::env::args().nth(1).unwrap_or_else(|| "tiny".into());
    let (cfg, seq) = if name == "small" {
        (Config::small(), 256)
    } else {
        (Config::tiny(), 128)
    };
    let (b, d, v) = (8, cfg.hidden_size, cfg.vocab_size);
    let n = b * seq;
    let device = Device::Cpu;
    let model = Model::new_random(&cfg, Heads::default(), 0, DType::F32, &device).unwrap();
    let ids = Tensor::rand(0f32, v as f32, (b, seq), &device)
        .unwrap()
        .to_dtype(DType::U32)
        .unwrap();
    let repeats = if name == "small" { 3 } else { 10 };
    if std::env::args().nth(2).as_deref() == Some("loop") {
        // Training steps only, for an external profiler.
        let vars = model.vars();
        let mut opt = troupe_model::AdamW::new(model.named_vars(), Default::default()).unwrap();
        for _ in 0..repeats * 3 {
            let logits = model.forward(&ids, None).unwrap();
            let mut grads = lm_loss(&logits, &ids, None).unwrap().backward().unwrap();
            troupe_model::clip_grad_norm(&mut grads, &vars, 1.0).unwrap();
            opt.step(&grads).unwrap();
        }
        return;
    }

    time("full forward + loss", repeats, || {
        let logits = model.forward(&ids, None).unwrap();
        lm_loss(&logits, &ids, None).unwrap();
        Ok(())
    });
    time("full forward + loss + backward", repeats, || {
        let logits = model.forward(&ids, None).unwrap();
        lm_loss(&logits, &ids, None).unwrap().backward()?;
        Ok(())
    });
    let hidden =
        Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, seq, d), &device).unwrap()).unwrap();
    time("lm head + loss forward", repeats, || {
        let logits = model.lm_logits(hidden.as_tensor()).unwrap();
        lm_loss(&logits, &ids, None).unwrap();
        Ok(())
    });
    time("lm head + loss forward + backward", repeats, || {
        let logits = model.lm_logits(hidden.as_tensor()).unwrap();
        lm_loss(&logits, &ids, None).unwrap().backward()?;
        Ok(())
    });
    let logits_var =
        Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, seq, v), &device).unwrap()).unwrap();
    time("loss only forward + backward", repeats, || {
        lm_loss(logits_var.as_tensor(), &ids, None)
            .unwrap()
            .backward()?;
        Ok(())
    });
    time("target log probs only forward + backward", repeats, || {
        let t = ids.flatten_all()?;
        troupe_model::ops::target_log_probs(&logits_var.as_tensor().reshape((n, v))?, &t, 1.0)?
            .sum_all()?
            .backward()?;
        Ok(())
    });
    for _ in 0..3 {
        let t = ids.flatten_all().unwrap();
        let t0 = Instant::now();
        let r = logits_var.as_tensor().reshape((n, v)).unwrap();
        let t1 = Instant::now();
        let lp = troupe_model::ops::target_log_probs(&r, &t, 1.0).unwrap();
        let t2 = Instant::now();
        let sum = lp.sum_all().unwrap();
        let t3 = Instant::now();
        let g = sum.backward().unwrap();
        let t4 = Instant::now();
        drop(g);
        let t5 = Instant::now();
        println!(
            "reshape {:?} op {:?} sum {:?} backward {:?} drop {:?}",
            t1 - t0,
            t2 - t1,
            t3 - t2,
            t4 - t3,
            t5 - t4
        );
    }
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, d), &device).unwrap()).unwrap();
    let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (v, d), &device).unwrap()).unwrap();
    time("matmul (n,d)x(d,V) forward", repeats, || {
        x.as_tensor().matmul(&w.as_tensor().t()?)?;
        Ok(())
    });
    time("matmul (n,d)x(d,V) forward + backward", repeats, || {
        x.as_tensor()
            .matmul(&w.as_tensor().t()?)?
            .sum_all()?
            .backward()?;
        Ok(())
    });
    let big = Tensor::randn(0f32, 1.0, (n, v), &device).unwrap();
    time("bwd matmul g(n,V) x w(V,d)", repeats, || {
        big.matmul(w.as_tensor())?;
        Ok(())
    });
    time("bwd matmul x.t()(d,n) x g(n,V)", repeats, || {
        x.as_tensor().t()?.matmul(&big)?;
        Ok(())
    });
    time("bwd matmul g.t()(V,n) x x(n,d)", repeats, || {
        big.t()?.matmul(x.as_tensor())?;
        Ok(())
    });
    time("x.t().contiguous() then matmul", repeats, || {
        x.as_tensor().t()?.contiguous()?.matmul(&big)?;
        Ok(())
    });
    time("zeros_like + add on (n,V)", repeats, || {
        let z = big.zeros_like()?;
        (z + &big)?;
        Ok(())
    });
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &device);
    for var in varmap.all_vars() {
        var.set(&(var.as_tensor().ones_like().unwrap() * 0.02).unwrap())
            .unwrap();
    }
    let attention = troupe_model::llama::Attention::load(vb.pp("attn"), &cfg).unwrap();
    let mlp = troupe_model::llama::Mlp::load(vb.pp("mlp"), &cfg).unwrap();
    let norm = troupe_model::llama::RmsNorm::load(vb.pp("norm"), d, 1e-5).unwrap();
    for var in varmap.all_vars() {
        let r = Tensor::randn(0f32, 0.02, var.shape(), &device).unwrap();
        var.set(&r).unwrap();
    }
    let half = cfg.head_dim / 2;
    let mut bias = vec![f32::NEG_INFINITY; b * seq * seq];
    for r in 0..b {
        for i in 0..seq {
            for j in 0..=i {
                bias[(r * seq + i) * seq + j] = 0.0;
            }
        }
    }
    let inputs = troupe_model::llama::AttentionInputs {
        cos: Tensor::ones((b, seq, half), DType::F32, &device).unwrap(),
        sin: Tensor::zeros((b, seq, half), DType::F32, &device).unwrap(),
        bias: Tensor::from_vec(bias, (b, seq, seq), &device).unwrap(),
    };
    let xs = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, seq, d), &device).unwrap()).unwrap();
    use candle_core::Module;
    let r3 = Tensor::randn(0f32, 1.0, (b, seq, d), &device).unwrap();
    time("attention forward", repeats, || {
        attention.forward(xs.as_tensor(), &inputs, None)?;
        Ok(())
    });
    time("attention forward + backward", repeats, || {
        (attention.forward(xs.as_tensor(), &inputs, None)? * &r3)?
            .sum_all()?
            .backward()?;
        Ok(())
    });
    time("mlp forward", repeats, || {
        mlp.forward(xs.as_tensor())?;
        Ok(())
    });
    time("mlp forward + backward", repeats, || {
        (mlp.forward(xs.as_tensor())? * &r3)?
            .sum_all()?
            .backward()?;
        Ok(())
    });
    time("rms norm forward + backward", repeats, || {
        norm.forward(xs.as_tensor())?.sum_all()?.backward()?;
        Ok(())
    });
    let q = Var::from_tensor(
        &Tensor::randn(
            0f32,
            1.0,
            (
                b,
                cfg.num_key_value_heads,
                seq * cfg.num_attention_heads / cfg.num_key_value_heads,
                cfg.head_dim,
            ),
            &device,
        )
        .unwrap(),
    )
    .unwrap();
    let k = Var::from_tensor(
        &Tensor::randn(
            0f32,
            1.0,
            (b, cfg.num_key_value_heads, seq, cfg.head_dim),
            &device,
        )
        .unwrap(),
    )
    .unwrap();
    time("scores matmul forward + backward", repeats, || {
        q.as_tensor()
            .matmul(&k.as_tensor().t()?)?
            .sum_all()?
            .backward()?;
        Ok(())
    });
    time("scores matmul forward", repeats, || {
        q.as_tensor().matmul(&k.as_tensor().t()?)?;
        Ok(())
    });
}
