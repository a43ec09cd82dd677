"""Loads a halfling checkpoint with Hugging Face transformers and reports the validation loss.

Usage: python3 tools/hf_loss_check.py RUN_DIR VAL_BIN [--device cuda|cpu]

It evaluates the same windows as `halfling eval` (non-overlapping windows of block_size tokens
with next-token targets, covering the whole split) so the two losses must agree to float
rounding. Needs torch, transformers and safetensors; not part of CI.
"""
import argparse
import json
import struct
import sys

import numpy as np
import torch
from transformers import GPT2LMHeadModel


def read_shard(path):
    with open(path, "rb") as f:
        header = f.read(64)
        magic, version, dtype_code, count = struct.unpack("<8sIIQ", header[:24])
        if magic != b"HLFTOKS1":
            sys.exit(f"{path}: not a halfling token shard")
        dtype = {2: np.uint16, 4: np.uint32}[dtype_code]
        return np.frombuffer(f.read(), dtype=dtype, count=count).astype(np.int64)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("val_bin")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    model = GPT2LMHeadModel.from_pretrained(f"{args.run}/checkpoint", torch_dtype=torch.float32)
    model.to(args.device).eval()
    t = model.config.n_positions
    tokens = read_shard(args.val_bin)
    windows = (len(tokens) - 1) // t
    x = torch.from_numpy(tokens[: windows * t].reshape(windows, t))
    y = torch.from_numpy(tokens[1 : windows * t + 1].reshape(windows, t))
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, windows, 256):
            xb, yb = x[i : i + 256].to(args.device), y[i : i + 256].to(args.device)
            logits = model(xb).logits.double()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), yb.reshape(-1), reduction="sum")
            total += loss.item()
            count += yb.numel()
    print(json.dumps({"hf_val_loss": total / count, "windows": windows, "tokens": count}))


if __name__ == "__main__":
    main()
