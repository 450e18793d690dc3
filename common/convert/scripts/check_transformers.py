"""Compare a troupe export of SmolLM2 with transformers' own GGUF loader.

transformers (with the `gguf` package) reads the GGUF file with its own
tokenizer conversion and dequantization, so agreement with troupe's export
checks troupe's importer against an independent implementation.

Usage:
    python check_transformers.py EXPORTED_HF_DIR FILE.gguf

Prints the token ids of a few texts from both tokenizers, the largest
logit difference between the two models on one prompt, the top-5 logits
after it, and both greedy continuations. Exits non-zero on a mismatch of
token ids or greedy text.
"""
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast

PROBES = [
    "The capital of France is",
    "digits 0123456789 and 42, 3.14159",
    "code: let x = vec![1, 2, 3];\n\tindented",
    "Ünïcödé 🙂 ñ ß 漢字",
    "<|im_start|>user\nHi<|im_end|>\n",
]
PROMPT = "The capital of France is"

torch.set_num_threads(2)
export_dir, gguf_path = sys.argv[1], sys.argv[2]
gguf_dir, gguf_name = os.path.split(os.path.abspath(gguf_path))

ours_tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(export_dir, "tokenizer.json"))
ref_tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
failed = False
for text in PROBES:
    ours = ours_tok(text, add_special_tokens=False).input_ids
    ref = ref_tok(text, add_special_tokens=False).input_ids
    same = ours == ref
    failed |= not same
    print(f"{'same' if same else 'DIFFERENT'} ids for {text!r}: {ours}" + ("" if same else f" vs {ref}"))

ours_model = LlamaForCausalLM.from_pretrained(export_dir, torch_dtype=torch.float32).eval()
ref_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, torch_dtype=torch.float32).eval()
ids = ref_tok(PROMPT, return_tensors="pt", add_special_tokens=False).input_ids
with torch.no_grad():
    ours_logits = ours_model(ids).logits[0]
    ref_logits = ref_model(ids).logits[0]
    print(f"max |logit difference| over {ids.shape[1]} positions: {(ours_logits - ref_logits).abs().max().item():.3g}"
          f" (logit RMS {ref_logits.pow(2).mean().sqrt().item():.3g})")
    top = torch.topk(ours_logits[-1], 5)
    print("top-5 after the prompt (troupe export):", [(int(i), round(float(v), 4)) for v, i in zip(top.values, top.indices)])
    top = torch.topk(ref_logits[-1], 5)
    print("top-5 after the prompt (transformers GGUF):", [(int(i), round(float(v), 4)) for v, i in zip(top.values, top.indices)])
    texts = []
    for model in (ours_model, ref_model):
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
        texts.append(ref_tok.decode(out[0][ids.shape[1]:]))
    print(f"greedy: troupe export {texts[0]!r}, transformers GGUF {texts[1]!r}")
    failed |= texts[0] != texts[1]
sys.exit(1 if failed else 0)
