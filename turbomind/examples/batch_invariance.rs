//! Checks batch invariance on a real checkpoint with the CPU backend's
//! default numerics (int8 activations for 4-bit linears) and, with
//! `LM_HEAD=int8`, the 8-bit output projection: 16 greedy sequences decoded
//! together give the same tokens as each decoded alone.
//! `cargo run --release -p lmq-turbomind --example batch_invariance --
//! MODEL_DIR [PROMPT_LEN] [NEW_TOKENS]`.

use std::path::PathBuf;

use lmq_turbomind::backend::cpu::CpuBackend;
use lmq_turbomind::model::{LogitsWanted, Model, SeqInput, SeqKv};
use lmq_turbomind::Result;

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(
        args.next()
            .expect("usage: batch_invariance MODEL_DIR [PROMPT] [NEW]"),
    );
    let prompt: usize = args
        .next()
        .map_or(40, |s| s.parse().expect("prompt length"));
    let new: usize = args.next().map_or(32, |s| s.parse().expect("new tokens"));
    let mut model = Model::load(&dir, CpuBackend::new())?;
    if std::env::var("LM_HEAD").is_ok_and(|v| v == "int8") {
        let head = model.backend().int8_linear(model.output_projection())?;
        model.set_output_projection(head);
    }
    let n = 16;
    let block_len = 64;
    let per_seq = (prompt + new + 8 * n).div_ceil(block_len);
    let vocab = model.config.vocab_size as u32;
    let mut seed = 17u64;
    let mut next = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) as u32 % vocab
    };
    // Prompts of different lengths, so that batched rows sit at different
    // offsets and positions.
    let prompts: Vec<Vec<u32>> = (0..n)
        .map(|i| (0..prompt + 5 * i).map(|_| next()).collect())
        .collect();
    let decode = |batch: &[usize]| -> Result<Vec<Vec<u32>>> {
        let mut pool = model.new_kv_pool(per_seq * batch.len(), block_len)?;
        let mut kvs: Vec<SeqKv> = (0..batch.len())
            .map(|s| SeqKv::contiguous((s * per_seq) as u32, per_seq as u32))
            .collect();
        let mut inputs: Vec<SeqInput<'_>> = kvs
            .iter_mut()
            .zip(batch)
            .map(|(kv, &i)| SeqInput {
                tokens: &prompts[i],
                kv,
                logits: LogitsWanted::Last,
            })
            .collect();
        let logits = model.forward(&mut pool, &mut inputs)?;
        let mut out: Vec<Vec<u32>> = logits.iter().map(|l| vec![argmax(l)]).collect();
        for _ in 1..new {
            let last: Vec<[u32; 1]> = out.iter().map(|t| [t[t.len() - 1]]).collect();
            let mut inputs: Vec<SeqInput<'_>> = kvs
                .iter_mut()
                .zip(&last)
                .map(|(kv, tok)| SeqInput {
                    tokens: tok,
                    kv,
                    logits: LogitsWanted::Last,
                })
                .collect();
            let logits = model.forward(&mut pool, &mut inputs)?;
            for (o, l) in out.iter_mut().zip(&logits) {
                o.push(argmax(l));
            }
        }
        Ok(out)
    };
    let all: Vec<usize> = (0..n).collect();
    let together = decode(&all)?;
    let mut same = 0;
    for (i, batched) in together.iter().enumerate() {
        let alone = decode(&[i])?;
        if &alone[0] == batched {
            same += 1;
        } else {
            println!(
                "sequence {i}: alone {:?}\n            batched {batched:?}",
                alone[0]
            );
        }
    }
    println!(
        "{same}/{n} sequences decode the same {new} tokens alone and in a batch of {n} (kernel {})",
        model.backend().quant_kernel_name()
    );
    if same != n {
        std::process::exit(1);
    }
    Ok(())
}
