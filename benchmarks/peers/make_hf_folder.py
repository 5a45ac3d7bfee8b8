"""GGUF -> HF folder (config.json + safetensors + tokenizer), for the peers that cannot read GGUF well.

    .peers/hf/bin/python benchmarks/peers/make_hf_folder.py MODEL.gguf OUT_DIR [--dtype float32]

transformers dequantizes the GGUF tensors; the folder is written to OUT_DIR.tmp and renamed at the end, so
a folder that exists is complete. vLLM and transformers then load the same weights.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("gguf")
    p.add_argument("out")
    p.add_argument("--dtype", default="float32")
    args = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(args.gguf).resolve()
    out = Path(args.out)
    if (out / "config.json").exists():
        print(f"exists: {out}")
        return 0
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    dtype = getattr(torch, args.dtype)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
    # Loaded through the GGUF "quantizer", which refuses to serialize; the weights are plain dequantized
    # tensors by now, so drop it (and its config entry, which would make vLLM expect a GGUF).
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    print(f"wrote {out} ({type(model).__name__}, {sum(t.numel() for t in model.parameters()) / 1e6:.0f}M params)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
