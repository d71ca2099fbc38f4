"""What ARR costs over plain LoRA SFT, measured side by side in one run.

    python -m bench.overhead --quick        # tiny model, plain LoRA and the default ARR path only: < 1 min
    python -m bench.overhead                # tiny model and SmolLM2-135M-Instruct, plus the loss-memory probe
    python -m bench.overhead --models tiny,path/to/model --steps 40 --batch-size 16   # any local folder or hub id
    python -m bench.overhead --models smollm2 --variants arr_chunked --loss-chunk-size 256   # another chunk size
    python -m bench.overhead --models smollm2 --variants arr_chunked --replay-seq-length 512 [--no-padding-free]

Each variant trains in its own process (same data, same steps, same global batch), so its peak memory is its own:
peak RSS on CPU, torch.cuda.max_memory_allocated on a GPU. ARR runs at the shipped defaults (arr/config.py) in
every variant but the way it gets the reference (replay rows are the embedded recipe's 64 tokens unless
--replay-seq-length says otherwise):
  lora         plain LoRA SFT (beta = 0, no replay)
  arr_naive    reference forward every step, loss through full [batch, seq, vocab] logits (loss_chunk_size = 0)
  arr_chunked  reference forward every step, chunked loss from hidden states (the shipped default)
  arr_topk     reference log-probs cached before training, top 64 plus tail mass (ref_cache=topk)
  arr_exact    reference log-probs cached before training, all of them (ref_cache=exact)
  arr_replay_kl  the KL on replay rows only (kl_on=replay): the reference forward runs on those rows alone
The first --warmup-steps steps of each variant (CUDA/allocator warm-up, lazy initialisation) are run but not timed.
A cached variant's one-off cache build is timed apart ("cache s") from the training loop, and for the top-k cache
the KL it gives is compared with the exact KL of the trained model on 16 rows ("top-k KL error").
The last line printed is one JSON object with wall_ratio and peak_mem_ratio of the shipped default ARR path against
plain LoRA, from this run (with --repeats N, the medians of N interleaved repeats, each against its own LoRA run).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

from transformers import TrainerCallback

VARIANTS = {
    "lora": {"beta": 0.0, "replay_ratio": 0.0},
    "arr_naive": {"loss_chunk_size": 0},
    "arr_chunked": {},
    "arr_topk": {"ref_cache": "topk"},
    "arr_exact": {"ref_cache": "exact"},
    "arr_replay_kl": {"kl_on": "replay"},
}
DEFAULT_PATH = "arr_chunked"


def peak_mb() -> float:
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_variant(model_name: str, variant: str, steps: int, batch_size: int = 8, warmup_steps: int = 1,
                  profile_file: str | None = None, loss_chunk_size: int | None = None,
                  replay_seq_length: int = 64, padding_free: bool = True) -> dict:
    """Runs in a child process: train `steps` steps and report the wall time and tokens of the steps after the first
    `warmup_steps`, and the peak memory. `model_name` is "tiny", "smollm2" (the embedded default) or a folder/hub id.
    With `profile_file`, the timed steps run under torch.profiler: its table of operators goes to that file and the
    time per step of the trainer's labelled regions (arr/...) into the result. `loss_chunk_size` replaces the shipped
    one in every variant that uses the chunked loss. `replay_seq_length` is the embedded recipe's (64, about the
    length of its SFT rows) unless given; `padding_free` False pads every batch in every variant."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from arr import ARRConfig, ARRTrainer, DataArguments, resources

    if model_name == "tiny":
        from bench.tiny import make_tokenizer, tiny_model

        tokenizer = make_tokenizer()
        model = tiny_model("llama", len(tokenizer))
    else:
        path = resources.default_model_path() if model_name == "smollm2" else model_name
        tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as out:
        config = ARRConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=batch_size,
                           replay_seq_length=replay_seq_length, padding_free=padding_free, save_strategy="no",
                           report_to="none", disable_tqdm=True, logging_steps=steps, bf16=device == "cuda",
                           **({} if loss_chunk_size is None else {"loss_chunk_size": loss_chunk_size}),
                           **VARIANTS[variant])
        replay = DataArguments().replay_data or resources.wiki_replay_texts()  # the shipped replay source
        trainer = ARRTrainer(model.to(device), config, train_dataset=resources.date_task("train"),
                             processing_class=tokenizer, replay_dataset=replay,
                             peft_config=LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32,
                                                    target_modules="all-linear"))
        tokens = []  # per micro-batch, in step order (gradient accumulation is 1)
        collate = trainer.data_collator
        trainer.data_collator = lambda rows: tokens.append(sum(len(r["input_ids"]) for r in rows)) or collate(rows)
        clock = StepClock(warmup_steps)
        trainer.add_callback(clock)
        profiler = StepProfiler(warmup_steps, steps - warmup_steps, profile_file) if profile_file else None
        if profiler:
            trainer.add_callback(profiler)
        trainer.train()
        result = {"seconds": clock.seconds, "tokens": sum(tokens[warmup_steps:steps]), "peak_mem_mb": peak_mb(),
                  "cache_seconds": trainer.ref_cache_info.get("seconds", 0.0)}
        if profiler:
            result["regions_ms"] = profiler.regions_ms
        if trainer.ref_cache is not None and trainer.ref_cache.topk:
            result.update(topk_kl_error(trainer, collate.pad_token_id))
    return result


class StepClock(TrainerCallback):
    """Wall time from the end of step `warmup_steps` to the end of training (synchronised with the GPU)."""

    def __init__(self, warmup_steps: int):
        self.warmup_steps, self.start, self.seconds = warmup_steps, None, None

    def now(self) -> float:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.warmup_steps:
            self.start = self.now()

    def on_train_end(self, args, state, control, **kwargs):
        self.seconds = self.now() - self.start


class StepProfiler(TrainerCallback):
    """torch.profiler over the steps after `warmup_steps`, host side only (tracing every kernel of a GPU run takes
    minutes, and at these sizes the GPU step is bound by the host); writes its operator table to `path` and keeps the
    host milliseconds per step of each arr/... region."""

    def __init__(self, warmup_steps: int, timed_steps: int, path: str):
        self.warmup_steps, self.timed_steps, self.path = warmup_steps, timed_steps, path
        self.profiler, self.regions_ms = None, {}

    def on_step_end(self, args, state, control, **kwargs):
        import torch

        if state.global_step == self.warmup_steps:
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.profiler.__enter__()

    def on_train_end(self, args, state, control, **kwargs):
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.profiler.__exit__(None, None, None)
        events = self.profiler.key_averages()
        Path(self.path).write_text(events.table(sort_by="self_cpu_time_total", row_limit=40))
        self.regions_ms = {e.key: e.cpu_time_total / 1000 / self.timed_steps for e in events
                           if e.key.startswith("arr/")}


def topk_kl_error(trainer, pad_token_id: int, n_rows: int = 16) -> dict:
    """Mean per-token KL of the trained model to the initial one on `n_rows` dataset rows, exact (online reference)
    and through the top-k cache."""
    import torch

    from arr.chunked_loss import RefLogprobs, kl_to_reference
    from arr.data import Collator

    model, cache = trainer.model.eval(), trainer.ref_cache
    rows = [trainer.train_dataset[i] for i in range(min(n_rows, len(trainer.train_dataset)))]
    batch = Collator(pad_token_id)(rows)  # padded: rows side by side
    device = next(model.parameters()).device
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        logits = model(**inputs).logits[:, :-1].float()
        with model.disable_adapter():
            ref_logits = model(**inputs).logits[:, :-1].float()
    kl_positions = trainer.objective.positions(batch).kl.to(device)
    logp = torch.log_softmax(logits[kl_positions], -1)
    exact = kl_to_reference(logp, RefLogprobs(torch.log_softmax(ref_logits[kl_positions], -1))).mean().item()
    entries = cache.positions(batch["row"], batch["input_ids"].shape[1])[kl_positions.cpu()]
    approx = kl_to_reference(logp, cache.lookup(entries, device)).mean().item()
    return {"exact_kl": exact, "topk_kl": approx, "topk_rel_error": (exact - approx) / exact if exact else 0.0}



def loss_memory(chunk: int | None = None, seq: int = 2048, hidden: int = 896, vocab: int = 151_936) -> dict:
    """Extra memory of the loss itself (forward + backward) at seq x vocab on synthetic hidden states, for the
    plain logits path and the chunked one (at the shipped loss_chunk_size unless `chunk`); each measured in its own
    process."""
    from arr.config import ARRConfig

    chunk = chunk or ARRConfig.__dataclass_fields__["loss_chunk_size"].default
    out = {"chunk": chunk}
    for name in ("naive", "chunked"):
        code = (f"import bench.overhead as b; import json; print(json.dumps(b._loss_memory_child("
                f"{name!r}, {seq}, {hidden}, {vocab}, {chunk})))")
        out[name] = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                              check=True).stdout.strip().splitlines()[-1])
    out["ratio"] = out["chunked"]["extra_mb"] / out["naive"]["extra_mb"]
    return out


def _loss_memory_child(name: str, seq: int, hidden_size: int, vocab: int, chunk: int) -> dict:
    import torch

    from arr.objective import ARRObjective
    from arr.reference import OnlineReference

    torch.manual_seed(0)
    torch.set_default_device("cuda" if torch.cuda.is_available() else "cpu")
    head = torch.nn.Linear(hidden_size, vocab, bias=False)
    head.weight.requires_grad_(False)
    hidden = torch.randn(1, seq, hidden_size, requires_grad=True)
    ref_hidden = torch.randn(1, seq, hidden_size)
    labels = torch.randint(0, vocab, (1, seq))
    batch = {"labels": labels, "attention_mask": torch.ones(1, seq, dtype=torch.long), "is_replay": torch.tensor([True])}
    objective = ARRObjective(beta=0.1, kl_on="all")
    before = peak_mb()
    if name == "naive":
        with torch.no_grad():
            ref_logits = head(ref_hidden)
        parts = objective(head(hidden), batch, OnlineReference(ref_logits))
    else:
        parts = objective(hidden, batch, OnlineReference(ref_hidden, head), head, chunk_size=chunk)
    parts.total.backward()
    return {"extra_mb": peak_mb() - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny model, lora and the default ARR path only; no SmolLM2, no loss-memory probe")
    parser.add_argument("--models", default=None,
                        help="comma-separated: tiny, smollm2 (the embedded default) or model folders/hub ids "
                             "(default: tiny,smollm2; tiny with --quick)")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps per variant, warm-up included (default 10 on the tiny model, 5 on others)")
    parser.add_argument("--warmup-steps", type=int, default=1, help="first steps of each variant left untimed")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per step")
    parser.add_argument("--profile", metavar="DIR", default=None,
                        help="profile the timed steps on the host: one operator table per run in DIR, and the "
                             "milliseconds per step of the trainer's arr/... regions printed")
    parser.add_argument("--loss-chunk-size", type=int, default=None,
                        help="tokens per chunk of the chunked loss, in every variant that uses it and in the "
                             "loss-memory probe (default: the shipped loss_chunk_size)")
    parser.add_argument("--replay-seq-length", type=int, default=64,
                        help="tokens per replay row (default 64, the embedded recipe's; ARRConfig's own default "
                             "is 512)")
    parser.add_argument("--no-padding-free", action="store_true",
                        help="pad every batch in every variant (padding_free: false) instead of the shipped packing")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run every variant this many times, interleaved; the JSON line then holds the medians")
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated subset of {', '.join(VARIANTS)} "
                             f"(lora and {DEFAULT_PATH}, the headline, always run)")
    args = parser.parse_args()
    if args.loss_chunk_size is not None and args.loss_chunk_size < 1:
        sys.exit(f"--loss-chunk-size must be >= 1, got {args.loss_chunk_size} (arr_naive is the unchunked loss)")
    models = (args.models or ("tiny" if args.quick else "tiny,smollm2")).split(",")
    variants = ["lora", DEFAULT_PATH] if args.quick else list(VARIANTS)
    if args.variants:
        variants = list(dict.fromkeys(["lora", DEFAULT_PATH, *args.variants.split(",")]))
        if unknown := set(variants) - set(VARIANTS):
            sys.exit(f"unknown variant(s) {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}")
    ratios = {}  # (model, variant) -> [(wall ratio, peak ratio) against plain LoRA of the same repeat]
    for model in models:
        steps = args.steps or (10 if model == "tiny" else 5)
        if steps <= args.warmup_steps:
            sys.exit(f"--steps ({steps}) must exceed --warmup-steps ({args.warmup_steps})")
        for repeat in range(args.repeats):
            base = None
            for variant in variants:
                r = run_variant(model, variant, steps, args, repeat)
                base = base or r
                wall, peak = r["seconds"] / base["seconds"], r["peak_mem_mb"] / base["peak_mem_mb"]
                ratios.setdefault((model, variant), []).append((wall, peak))
                extra = f"  cache {r['cache_seconds']:.1f} s" if r["cache_seconds"] else ""
                if "topk_rel_error" in r:
                    extra += (f"  top-k KL error {100 * r['topk_rel_error']:.2f}% "
                              f"({r['topk_kl']:.5f} vs exact {r['exact_kl']:.5f})")
                print(f"{Path(model).name:12s} {variant:12s} {r['tokens'] / r['seconds']:9.0f} tok/s  "
                      f"wall x{wall:.3f}  peak {r['peak_mem_mb']:8.0f} MB  x{peak:.3f}{extra}", flush=True)
                for region, ms in r.get("regions_ms", {}).items():
                    print(f"{'':12s}   {region:24s} {ms:8.1f} ms/step (host)", flush=True)
        if args.repeats > 1:
            for variant in variants[1:]:
                walls, peaks = (sorted(column) for column in zip(*ratios[model, variant]))
                print(f"{Path(model).name:12s} {variant:12s} median of {args.repeats}: wall x{median(walls):.3f} "
                      f"(x{walls[0]:.3f} to x{walls[-1]:.3f})  peak x{median(peaks):.3f} "
                      f"(x{peaks[0]:.3f} to x{peaks[-1]:.3f})", flush=True)
    if not args.quick:
        memory = loss_memory(args.loss_chunk_size)
        print(f"loss memory at 2048 x 151936: naive {memory['naive']['extra_mb']:.0f} MB, chunked "
              f"(chunk {memory['chunk']}) "
              f"{memory['chunked']['extra_mb']:.0f} MB, ratio {memory['ratio']:.3f}", flush=True)
    headline = ratios[models[-1], DEFAULT_PATH]
    chunk = {} if args.loss_chunk_size is None else {"loss_chunk_size": args.loss_chunk_size}
    print(json.dumps({"model": models[-1], "path": DEFAULT_PATH, **chunk,
                      "wall_ratio": round(median(w for w, _ in headline), 4),
                      "peak_mem_ratio": round(median(p for _, p in headline), 4)}))


def run_variant(model: str, variant: str, steps: int, args, repeat: int) -> dict:
    """`train_variant` in a child process of its own (so that its peak memory is its own)."""
    profile_file = None
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
        profile_file = str(Path(args.profile) / f"{Path(model).name}_{variant}_{repeat}.txt")
    code = (f"import bench.overhead as b, json; "
            f"print(json.dumps(b.train_variant({model!r}, {variant!r}, {steps}, {args.batch_size}, "
            f"{args.warmup_steps}, {profile_file!r}, {args.loss_chunk_size!r}, {args.replay_seq_length}, "
            f"{not args.no_padding_free})))")
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
