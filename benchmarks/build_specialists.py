"""Build single-skill specialists of SmolLM2-135M-Instruct for the mixture benchmark (issue 11).

Each specialist is the base model fine-tuned for a few minutes on CPU on one task family of
`mixserve/scaling/tasks` (difficulty 1) and saved as an HF folder (config.json, model.safetensors,
tokenizer) under `~/.cache/mixserve/specialists/<name>`; a folder that exists is reused (`--force`
rebuilds). Training code is benchmark code, not part of the package.

    PYTHONPATH=. .venv/bin/python benchmarks/build_specialists.py                  # build + evaluate
    PYTHONPATH=. .venv/bin/python benchmarks/build_specialists.py --eval-only      # evaluate cached ones

How: the base fp32 weights come from the GGUF through mixserve's own loader (Q4_1 dequantized), mapped
into a transformers `LlamaForCausalLM` (checked: its greedy text equals mixserve's on one prompt). The
prompt is the question through the chat template (as `LLMExpert` sends it); the target is
`Answer: <reference><|im_end|>`; the loss is on the target tokens only. To fit minutes on a shared CPU,
only the top `--train-layers` decoder layers are trained: the frozen lower layers' outputs are computed
once per training example (no grad) and the top layers are trained on them for several epochs
(embeddings and the tied LM head stay frozen). Training questions that also occur in the held-out sets
(evaluation seed, and the benchmark's validation/test seeds 1000 and 0) are dropped.

Then: greedy accuracy of the base and of every specialist on held-out questions of every family (through
mixserve's engine, which also checks the written folders load), printed as a table and written to
`benchmarks/results/specialists_<stamp>.json`; and, per specialist, transformers' and mixserve's greedy
text on one prompt (they must be equal).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mixserve.hub import resolve_model
from mixserve.loading.checkpoint import Checkpoint, load_checkpoint
from mixserve.scaling.tasks import get_task
from mixserve.scaling.tasks.base import Problem

RESULTS = Path(__file__).parent / "results"
CACHE = Path.home() / ".cache" / "mixserve" / "specialists"
HELD_OUT_SEEDS = (0, 1000)  # bench_mixture.py's test and validation sets


def hf_model(ckpt: Checkpoint) -> Any:
    """transformers `LlamaForCausalLM` with the checkpoint's fp32 weights (tied LM head)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = {k: v for k, v in ckpt.hf_config.items() if k != "architectures"}
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    missing = model.load_state_dict(dict(ckpt.weights(dtype=torch.float32)), strict=False).missing_keys
    if set(missing) - {"lm_head.weight"}:
        raise ValueError(f"weights missing from {ckpt.path}: {missing}")
    model.tie_weights()
    return model.eval()


def chat(ckpt: Checkpoint, question: str) -> str:
    return ckpt.tokenizer.apply_chat_template([{"role": "user", "content": question}])


def target(problem: Problem) -> str:
    ref = problem.reference.replace(",", ", ") if problem.task == "sorting" else problem.reference
    return f"Answer: {ref}"


def training_set(task: str, n: int, seed: int, held_out: set[str]) -> list[Problem]:
    problems = [p for p in get_task(task).generate(n * 3, seed, 1) if p.question not in held_out]
    return problems[:n]


def encode(ckpt: Checkpoint, problems: Sequence[Problem]) -> list[tuple[list[int], list[int]]]:
    tok = ckpt.tokenizer
    eos = tok.eos_token_id
    im_end = tok.token_to_id("<|im_end|>")
    stop = im_end if im_end is not None else eos
    return [(tok.encode(chat(ckpt, p.question), add_special_tokens=False),
             tok.encode(target(p), add_special_tokens=False) + ([stop] if stop is not None else []))
            for p in problems]


def _layer(layer: Any, h: torch.Tensor, pos: Any, position_ids: torch.Tensor) -> torch.Tensor:
    out = layer(h, attention_mask=None, position_ids=position_ids, position_embeddings=pos)
    return out[0] if isinstance(out, tuple) else out


def run_layers(model: Any, h: torch.Tensor, layers: Sequence[Any]) -> torch.Tensor:
    """Causal forward through `layers` (right-padded batches need no mask: padding comes last)."""
    position_ids = torch.arange(h.shape[1]).unsqueeze(0).expand(h.shape[0], -1)
    pos = model.model.rotary_emb(h, position_ids)
    for layer in layers:
        h = _layer(layer, h, pos, position_ids)
    return h


def batches(pairs: list[tuple[list[int], list[int]]], size: int, pad: int
            ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(ids [B, T], positions of the logits that predict a target token, the targets)."""
    out = []
    for i in range(0, len(pairs), size):
        chunk = pairs[i:i + size]
        width = max(len(p) + len(a) for p, a in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        rows, cols, tgt = [], [], []
        for b, (p, a) in enumerate(chunk):
            ids[b, :len(p) + len(a)] = torch.tensor(p + a)
            for j, t in enumerate(a):
                rows.append(b)
                cols.append(len(p) - 1 + j)
                tgt.append(t)
        out.append((ids, torch.tensor([rows, cols]), torch.tensor(tgt)))
    return out


def train(model: Any, pairs: list[tuple[list[int], list[int]]], args: argparse.Namespace, pad: int,
          label: str) -> dict[str, Any]:
    from tqdm import tqdm

    torch.manual_seed(args.seed)
    layers = list(model.model.layers)
    split = len(layers) - args.train_layers
    lower, upper = layers[:split], layers[split:]
    for p in model.parameters():
        p.requires_grad = False
    params = [p for layer in upper for p in layer.parameters()] + list(model.model.norm.parameters())
    for p in params:
        p.requires_grad = True
    t0 = time.perf_counter()
    data = batches(pairs, args.batch_size, pad)
    cached = []
    with torch.no_grad():
        for ids, where, tgt in tqdm(data, desc=f"{label}: frozen layers", leave=False):
            cached.append((run_layers(model, model.model.embed_tokens(ids), lower), where, tgt))
    precompute_s = time.perf_counter() - t0
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    steps = args.epochs * len(cached)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5) * max(0.05, 1 - s / steps))
    rng = random.Random(args.seed)
    losses: list[float] = []
    t1 = time.perf_counter()
    model.train()
    bar = tqdm(total=steps, desc=f"{label}: train top {args.train_layers} layers")
    for _ in range(args.epochs):
        order = list(range(len(cached)))
        rng.shuffle(order)
        for i in order:
            h, where, tgt = cached[i]
            out = model.model.norm(run_layers(model, h, upper))
            logits = model.lm_head(out[where[0], where[1]])
            loss = torch.nn.functional.cross_entropy(logits, tgt)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
            losses.append(float(loss))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    for p in model.parameters():
        p.requires_grad = False
    train_s = time.perf_counter() - t1
    return {"examples": len(pairs), "steps": steps, "precompute_s": precompute_s, "train_s": train_s,
            "s_per_step": train_s / max(steps, 1), "loss_first": losses[:5], "loss_last": losses[-5:]}


def save(model: Any, ckpt: Checkpoint, out: Path, meta: dict[str, Any]) -> None:
    from mixserve.experts.moefy import _write_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    _write_tokenizer(ckpt, out)
    (out / "specialist.json").write_text(json.dumps(meta, indent=1))


def greedy_hf(model: Any, ckpt: Checkpoint, question: str, max_tokens: int) -> str:
    ids = ckpt.tokenizer.encode(chat(ckpt, question), add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False)
    return ckpt.tokenizer.decode(out[0, len(ids):].tolist())


def evaluate(model_path: str, tasks: list[str], problems: dict[str, list[Problem]], max_tokens: int
             ) -> tuple[dict[str, float], Any]:
    """Greedy accuracy per task through mixserve's engine; returns the LLM too (for the equality check)."""
    from mixserve.llm import LLM
    from mixserve.sampling_params import SamplingParams

    llm = LLM(model_path)
    acc = {}
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    for t in tasks:
        prompts = [llm.chat_prompt([{"role": "user", "content": p.question}]) for p in problems[t]]
        outs = llm.generate(prompts, params)
        task = get_task(t)
        acc[t] = sum(task.check(p, task.extract(o.outputs[0].text))
                     for p, o in zip(problems[t], outs, strict=True)) / len(outs)
    return acc, llm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="smollm2-135m", help="known model name or path (llama family)")
    ap.add_argument("--tasks", default="arithmetic,sorting,gcd", help="one specialist per task family")
    ap.add_argument("--examples", type=int, default=192, help="training questions per specialist")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--train-layers", type=int, default=6, help="top decoder layers trained (of 30)")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--train-seed", type=int, default=4242, help="task generator seed of the training set")
    ap.add_argument("--eval-seed", type=int, default=555, help="held-out evaluation set seed")
    ap.add_argument("--eval-per-task", type=int, default=30)
    ap.add_argument("--eval-max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", default=str(CACHE))
    ap.add_argument("--force", action="store_true", help="rebuild specialists that are cached")
    ap.add_argument("--eval-only", action="store_true")
    ap.add_argument("--no-base", action="store_true", help="do not evaluate the base model")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tasks = args.tasks.split(",")
    base_path = str(resolve_model(args.base, progress=False))
    ckpt = load_checkpoint(base_path)
    eval_sets = {t: get_task(t).generate(args.eval_per_task, args.eval_seed, 1) for t in tasks}
    held_out = {p.question for t in tasks for s in HELD_OUT_SEEDS for p in get_task(t).generate(50, s, 1)}
    held_out |= {p.question for ps in eval_sets.values() for p in ps}
    pad = ckpt.hf_config.get("pad_token_id") or 0
    out: dict[str, Any] = {"args": vars(args), "base": base_path, "note": "loaded machine (shared 2-core CPU)",
                           "specialists": {}, "accuracy": {}}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"specialists_{stamp}.json"
    probe = eval_sets[tasks[0]][0].question
    folders = {}
    for task in tasks:
        folder = Path(args.cache_dir) / f"smollm2-135m-{task}"
        folders[task] = folder
        if args.eval_only or ((folder / "model.safetensors").exists() and not args.force):
            print(f"[specialists] {task}: cached at {folder}", flush=True)
            continue
        model = hf_model(ckpt)
        if task == tasks[0]:
            out["base_hf_greedy"] = greedy_hf(model, ckpt, probe, 24)
        problems = training_set(task, args.examples, args.train_seed, held_out)
        info = train(model, encode(ckpt, problems), args, pad, task)
        info["task"] = task
        save(model, ckpt, folder, {"base": base_path, "task": task, "difficulty": 1, **info})
        info["hf_greedy"] = greedy_hf(model, ckpt, probe, 24)
        out["specialists"][task] = info
        path.write_text(json.dumps(out, indent=1))
        print(f"[specialists] {task}: {info['steps']} steps, {info['s_per_step']:.2f} s/step, "
              f"precompute {info['precompute_s']:.0f} s, loss {info['loss_first'][0]:.3f} -> "
              f"{info['loss_last'][-1]:.3f} -> {folder}", flush=True)
    models = {**({} if args.no_base else {"base": base_path}), **{f"spec-{t}": str(f) for t, f in folders.items()}}
    for name, mpath in models.items():
        acc, llm = evaluate(mpath, tasks, eval_sets, args.eval_max_tokens)
        out["accuracy"][name] = acc
        from mixserve.sampling_params import SamplingParams

        ms = llm.generate([llm.chat_prompt([{"role": "user", "content": probe}])],
                          SamplingParams(max_tokens=24, temperature=0.0))[0].outputs[0].text
        out.setdefault("mixserve_greedy", {})[name] = ms
        llm.close() if hasattr(llm, "close") else None
        del llm
        path.write_text(json.dumps(out, indent=1))
        print(f"[specialists] {name}: " + ", ".join(f"{t} {a:.2f}" for t, a in acc.items()), flush=True)
    from transformers import LlamaForCausalLM

    for t, folder in folders.items():  # the written folder through transformers vs through mixserve
        hf = greedy_hf(LlamaForCausalLM.from_pretrained(str(folder)).eval(), ckpt, probe, 24)
        ms = out["mixserve_greedy"][f"spec-{t}"]
        out.setdefault("hf_equals_mixserve", {})[f"spec-{t}"] = {"equal": hf == ms, "transformers": hf,
                                                                 "mixserve": ms}
        print(f"[specialists] spec-{t}: transformers greedy == mixserve greedy: {hf == ms} ({hf!r} / {ms!r})")
    if "base_hf_greedy" in out and "base" in out["mixserve_greedy"]:
        out["base_hf_equals_mixserve"] = out["base_hf_greedy"] == out["mixserve_greedy"]["base"]
    path.write_text(json.dumps(out, indent=1))
    print_table(out, tasks)
    print(f"-> {path}")


def print_table(out: dict[str, Any], tasks: list[str]) -> None:
    print(f"\n{'model':<18}" + "".join(f"{t:>12}" for t in tasks))
    for name, acc in out["accuracy"].items():
        print(f"{name:<18}" + "".join(f"{acc[t]:>12.2f}" for t in tasks))


if __name__ == "__main__":
    main()
