"""What ARR costs over plain LoRA SFT, measured side by side in one run.

    python -m bench.overhead --quick        # tiny model, plain LoRA and the shipped default, both workloads: < 1 min
    python -m bench.overhead --quick --models smollm2 --repeats 3   # the same on SmolLM2, medians of 3 repeats
    python -m bench.overhead --quick --models smollm2 --memory      # and each run's allocated peak (CPU)
    python -m bench.overhead                # tiny model and SmolLM2-135M-Instruct, plus the loss-memory probe
    python -m bench.overhead --models tiny,path/to/model --steps 40 --batch-size 16   # any local folder or hub id
    python -m bench.overhead --models smollm2 --variants arr_online --loss-chunk-size 256   # another chunk size
    python -m bench.overhead --models smollm2 --variants arr_online --replay-seq-length 512 [--no-padding-free]
    python -m bench.overhead --quick --models smollm2 --load-in-4bit --memory   # QLoRA: both on the 4-bit base

Two workloads, each the run a user would start: `embedded` (the embedded recipe: 24 steps over the date task's 200
rows, a single pass) and `epochs3` (3 epochs of the same data, the few-shot regime of the ARR paper: 87 steps, every
row seen three times). Each variant trains in its own process (same data, same global batch), so its peak memory is
its own: peak RSS on CPU, torch.cuda.max_memory_allocated on a GPU. A run's wall time is its set-up that ARR adds
(the reference cache build, timed in full) plus its steps; the steps are timed over --steps steps after
--warmup-steps untimed ones and scaled to the run's step count ("timed N of S steps"), plain LoRA's to the same
steps as the variant it is compared with (replay rows make an epoch longer). Every run starts from an empty
$ARR_CACHE, as a model's first run does: a run with self-generated replay generates its answers (the seconds are
printed, and the wall ratio with them, but the wall ratio leaves them out: they are paid once per model and
settings, like the model's download) and, when it caches their reference, records it from the same decoding (the
seconds this adds are counted as the cache build). Variants (shipped defaults, arr/config.py, but what is named):
  lora           plain LoRA SFT (beta = 0, no replay)
  arr            the shipped default: the KL on the self-generated replay rows alone, whose top-64 reference
                 log-probs ref_cache: auto caches once for every later run of the model (recorded here while
                 generating the answers, counted)
  arr_replay_online  the shipped default with the on-line reference on the replay rows (ref_cache: none)
  arr_added      the shipped default with its replay added on top of the task's rows (replay_mode: add): every
                 step trains the batch's task rows, as plain LoRA, and about 8/7 replay rows besides
  arr_b1         the shipped default at beta 1, the default before issue 28's frontier (the same work a step)
  arr_b1_r25, arr_b1_r50, arr_b03, arr_b1_mtt01
                 the steps of issue 28's other frontier candidates (experiments/frontier.py's _r25, _r50, _b03,
                 _mtt01): arr_b1 with replay ratio 0.25 or 0.5, beta 0.3, or kl_on: all with task_kl_beta 0.1
  arr_kl_all     the KL on every position of every row (kl_on: all, the default before), ref_cache: auto
  arr_online     arr_kl_all with the on-line exact reference on every step (ref_cache: none)
  arr_naive      arr_online with the loss through full [batch, seq, vocab] logits (loss_chunk_size = 0)
  arr_topk       arr_kl_all through a top-64 reference cache (ref_cache: topk), whatever the workload
  arr_exact      arr_kl_all through a cache of all reference log-probs (ref_cache: exact)
For a top-k cache the KL it gives is compared with the exact KL of the trained model on 16 rows ("top-k KL error").
A run's wall time counts its cache build: what a first run costs. A later run that reads the cache costs its steps
alone ("when an earlier run built it").
The last line printed is one JSON object with wall_ratio and peak_mem_ratio of the shipped default against plain LoRA
on each workload (top level: the embedded recipe), wall_ratio_cache_reused, a later run's wall ratio, from this
run, and with --memory alloc_peak_ratio (with --repeats N, the medians of N interleaved repeats, each against its
own LoRA run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

from transformers import TrainerCallback

_KL_ALL = {"kl_on": "all"}
VARIANTS = {
    "lora": {"beta": 0.0, "replay_ratio": 0.0},
    "arr": {},
    "arr_replay_online": {"ref_cache": "none"},
    "arr_added": {"replay_mode": "add"},
    "arr_b1": {"beta": 1.0},
    # the steps of the frontier's other candidates (experiments/frontier.py, issue 28): beta 1 unless they set it
    "arr_b1_r25": {"beta": 1.0, "replay_ratio": 0.25},
    "arr_b1_r50": {"beta": 1.0, "replay_ratio": 0.5},
    "arr_b03": {"beta": 0.3},
    "arr_b1_mtt01": {"beta": 1.0, "kl_on": "all", "task_kl_beta": 0.1},
    "arr_kl_all": _KL_ALL,
    "arr_online": {**_KL_ALL, "ref_cache": "none"},
    "arr_naive": {**_KL_ALL, "ref_cache": "none", "loss_chunk_size": 0},
    "arr_topk": {**_KL_ALL, "ref_cache": "topk"},
    "arr_exact": {**_KL_ALL, "ref_cache": "exact"},
}
DEFAULT_PATH = "arr"
WORKLOADS = {"embedded": {}, "epochs3": {"max_steps": -1, "num_train_epochs": 3}}  # over the embedded recipe


def peak_mb() -> float:
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_variant(model_name: str, variant: str, workload: str, steps: int, batch_size: int = 8,
                  warmup_steps: int = 1, profile_file: str | None = None, loss_chunk_size: int | None = None,
                  replay_seq_length: int = 64, padding_free: bool = True, allocations: bool = False,
                  model_keys: dict | None = None) -> dict:
    """Runs in a child process: set up the `workload`'s run, train its first `steps` steps and report the wall time
    and tokens of the steps after the first `warmup_steps`, the run's step count, the reference cache build's
    seconds and the peak memory. `model_name` is "tiny", "smollm2" (the embedded default) or a folder/hub id. With
    `profile_file`, the timed steps run under torch.profiler: its table of operators goes to that file and the time
    per step of the trainer's labelled regions (arr/...) into the result. `loss_chunk_size` replaces the shipped one
    in every variant that uses the chunked loss. `replay_seq_length` is the embedded recipe's (64, about the length
    of its SFT rows) unless given; `padding_free` False pads every batch in every variant. With `allocations` the
    run is recorded by AllocationPeak instead and returns its allocated peaks alone: the run's, the model's loading's
    and the rest's ({"alloc_peak_mb", "load_peak_mb", "train_peak_mb"}). `model_keys`: ModelArguments keys
    for loading a real model (dtype, load_in_4bit, ...; --dtype and --load-in-4bit), as `arr train` loads it."""
    if allocations:  # from before the model loads: all that the run allocates, on this one thread
        os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
    recorder = AllocationPeak() if allocations else None
    import torch
    from peft import LoraConfig
    from arr import ARRConfig, ARRTrainer, DataArguments, resources
    from arr.keys import DEFAULT_RECIPE, read_config
    from arr.config import ModelArguments
    from arr.initial import is_quantized, load_model, load_tokenizer

    if model_name == "tiny":
        from bench.tiny import make_tokenizer, tiny_model

        tokenizer = make_tokenizer()
        model = tiny_model("llama", len(tokenizer))
    else:
        path = str(resources.default_model_path() if model_name == "smollm2" else model_name)
        tokenizer, model = load_tokenizer(path), load_model(ModelArguments(**(model_keys or {})), path)
    if recorder:
        recorder.mark()  # loaded
    device = "cuda" if torch.cuda.is_available() else "cpu"
    run_length = {"max_steps": read_config(str(DEFAULT_RECIPE), [])["max_steps"], **WORKLOADS[workload]}
    with tempfile.TemporaryDirectory() as out:
        os.environ["ARR_CACHE"] = out  # (after the model's conversion is read) caches of its own: a first run
        config = ARRConfig(output_dir=out, per_device_train_batch_size=batch_size, **run_length,
                           replay_seq_length=replay_seq_length, padding_free=padding_free, save_strategy="no",
                           report_to="none", disable_tqdm=True, logging_steps=steps, bf16=device == "cuda",
                           **({} if loss_chunk_size is None else {"loss_chunk_size": loss_chunk_size}),
                           **VARIANTS[variant])
        replay = DataArguments().replay_data or resources.wiki_replay_texts()  # the shipped replay source
        trainer = ARRTrainer(model if is_quantized(model) else model.to(device), config, train_dataset=resources.date_task("train"),
                             processing_class=tokenizer, replay_dataset=replay,
                             peft_config=LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32,
                                                    target_modules="all-linear"))
        tokens = []  # per micro-batch, in step order (gradient accumulation is 1)
        collate = trainer.data_collator
        trainer.data_collator = lambda items: tokens.append(sum(  # (an item with replay added on top is a list)
            len(r["input_ids"]) for item in items for r in (item if isinstance(item, list) else [item]))
        ) or collate(items)
        clock = StepClock(warmup_steps, steps)
        trainer.add_callback(clock)
        profiler = StepProfiler(warmup_steps, steps - warmup_steps, profile_file) if profile_file else None
        if profiler:
            trainer.add_callback(profiler)
        trainer.train()
        if recorder:
            peak = recorder.stop()
            return {"alloc_peak_mb": peak, "load_peak_mb": recorder.phase_peaks[0],
                    "train_peak_mb": recorder.phase_peaks[1]}
        result = {"seconds": clock.seconds, "timed_steps": clock.timed_steps, "run_steps": trainer.state.max_steps,
                  "tokens": sum(tokens[warmup_steps:steps]), "peak_mem_mb": peak_mb(),
                  "cache_seconds": trainer.ref_cache_info.get("seconds", 0.0),
                  "self_replay_seconds": trainer.self_replay_info.get("seconds", 0.0)}
        if profiler:
            result["regions_ms"] = profiler.regions_ms
        if trainer.ref_cache is not None and trainer.ref_cache.topk:
            result.update(topk_kl_error(trainer, collate.pad_token_id))
    return result


def run_seconds(result: dict, steps: int, cache_built: bool = True) -> float:
    """Wall time of a run of `steps` steps: the cache build (unless an earlier run built it) plus the timed steps'
    mean time per step."""
    return result["cache_seconds"] * cache_built + result["seconds"] / result["timed_steps"] * steps


class AllocationPeak:
    """The most bytes torch holds allocated on the CPU between its creation and `stop()`, from the profiler's record
    of every allocation and free: torch has no CPU counterpart of torch.cuda.max_memory_allocated, and peak RSS also
    counts freed memory the C allocator keeps, which moves by 5-10% between identical runs on this machine. The
    profiler slows the run, so the bench records it in a run of its own. It sees the thread that creates it only, so
    the bench loads models without transformers' loader threads. `mark()` splits the record in two: `stop()` then also
    sets `phase_peaks`, the most held before the mark and from it on, each counting all that is held."""

    MARK = "bench/allocation-phase"

    def __init__(self):
        import torch

        self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
        self.profiler.__enter__()
        self.phase_peaks = None

    def mark(self) -> None:
        import torch

        with torch.profiler.record_function(self.MARK):
            pass

    def stop(self) -> float:
        import torch

        self.profiler.__exit__(None, None, None)
        events = list(self.profiler.profiler.kineto_results.events())
        marks = [e.start_ns() for e in events if e.name() == self.MARK]
        records = sorted((e.start_ns(), e.nbytes()) for e in events
                         if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
        held, phases = 0, [0, 0]
        for start, nbytes in records:  # + allocated, - freed
            held += nbytes
            phase = bool(marks) and start >= marks[0]
            phases[phase] = max(phases[phase], held)
        if marks:
            self.phase_peaks = [peak / 2**20 for peak in phases]
        return max(phases) / 2**20


class StepClock(TrainerCallback):
    """Wall time from the end of step `warmup_steps` to the end of step `stop_after`, where it stops training
    (synchronised with the GPU)."""

    def __init__(self, warmup_steps: int, stop_after: int):
        self.warmup_steps, self.stop_after = warmup_steps, stop_after
        self.start, self.seconds, self.timed_steps = None, None, 0

    def now(self) -> float:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.warmup_steps:
            self.start = self.now()
        if state.global_step >= self.stop_after:
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        if self.start is None:
            raise SystemExit(f"the run has {state.global_step} steps: fewer than --warmup-steps + 1")
        self.seconds, self.timed_steps = self.now() - self.start, state.global_step - self.warmup_steps


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
    """Mean per-token KL of the trained model to the initial one on the first `n_rows` dataset rows that hold KL
    positions, exact (online reference) and through the top-k cache."""
    import torch

    from arr.chunked_loss import RefLogprobs, kl_to_reference
    from arr.data import Collator

    model, cache = trainer.model.eval(), trainer.ref_cache
    dataset = trainer.train_dataset
    rows = [dataset[i] for i in dataset.indices(trainer.objective.kl_rows())[:n_rows]]
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
                        help="lora and the default ARR path only, no loss-memory probe; the tiny model unless "
                             "--models names others")
    parser.add_argument("--models", default=None,
                        help="comma-separated: tiny, smollm2 (the embedded default) or model folders/hub ids "
                             "(default: tiny,smollm2; tiny with --quick)")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps per variant, warm-up included (default 10 on the tiny model, 9 on others)")
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
    parser.add_argument("--memory", action="store_true",
                        help="also run each variant once more (first repeat only) recording torch's CPU allocations "
                             "(AllocationPeak): its allocated peak against plain LoRA's, which peak RSS measures "
                             "with the allocator's noise; CPU only (on a GPU the peak already is torch's allocated "
                             "bytes)")
    parser.add_argument("--dtype", default="float32",
                        help="weights dtype of a real model (ModelArguments.dtype; float32 is the embedded recipe's)")
    parser.add_argument("--load-in-4bit", action="store_true",
                        help="QLoRA: every variant on the base in 4 bits (NF4, compute in --dtype), as load_in_4bit")
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help=f"comma-separated subset of {', '.join(WORKLOADS)} (default: both)")
    args = parser.parse_args()
    import torch

    if args.memory and torch.cuda.is_available():
        sys.exit("--memory records CPU allocations; on a GPU the peak printed is torch's allocated bytes already")
    if args.loss_chunk_size is not None and args.loss_chunk_size < 1:
        sys.exit(f"--loss-chunk-size must be >= 1, got {args.loss_chunk_size} (arr_naive is the unchunked loss)")
    models = (args.models or ("tiny" if args.quick else "tiny,smollm2")).split(",")
    if (args.load_in_4bit or args.dtype != "float32") and "tiny" in models:
        sys.exit("--load-in-4bit and --dtype load a real model: name it with --models (e.g. smollm2)")
    variants = ["lora", DEFAULT_PATH] if args.quick else list(VARIANTS)
    if args.variants:
        variants = list(dict.fromkeys(["lora", DEFAULT_PATH, *args.variants.split(",")]))
        if unknown := set(variants) - set(VARIANTS):
            sys.exit(f"unknown variant(s) {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}")
    workloads = args.workloads.split(",")
    if unknown := set(workloads) - set(WORKLOADS):
        sys.exit(f"unknown workload(s) {', '.join(sorted(unknown))}; choose from {', '.join(WORKLOADS)}")
    # (model, workload, variant) -> [(wall ratio, peak ratio, a later run's wall ratio) against plain LoRA of the same
    # repeat]
    ratios, allocated = {}, {}  # allocated: (model, workload, variant) -> allocated peak MB, with --memory
    for model in models:
        steps = args.steps or (10 if model == "tiny" else 9)
        if steps <= args.warmup_steps:
            sys.exit(f"--steps ({steps}) must exceed --warmup-steps ({args.warmup_steps})")
        for workload in workloads:
            for repeat in range(args.repeats):
                base = None
                for variant in variants:
                    r = run_variant(model, variant, workload, steps, args, repeat)
                    base = base or r
                    # at the same steps: the variant's run (replay rows lengthen an epoch) for both
                    wall, reused = (run_seconds(r, r["run_steps"], built) / run_seconds(base, r["run_steps"])
                                    for built in (True, False))
                    with_generation = wall + r["self_replay_seconds"] / run_seconds(base, r["run_steps"])
                    peak = r["peak_mem_mb"] / base["peak_mem_mb"]
                    ratios.setdefault((model, workload, variant), []).append((wall, peak, reused))
                    print(f"{Path(model).name:12s} {workload:9s} {variant:17s} {r['tokens'] / r['seconds']:7.0f} tok/s"
                          f"  step x{r['seconds'] / base['seconds']:.3f}  wall x{wall:.3f}  peak "
                          f"{r['peak_mem_mb']:7.0f} MB x{peak:.3f}  {note(r, reused, with_generation)}", flush=True)
                    for region, ms in r.get("regions_ms", {}).items():
                        print(f"{'':12s}   {region:24s} {ms:8.1f} ms/step (host)", flush=True)
                    if args.memory and repeat == 0:  # deterministic: once
                        peaks = run_variant(model, variant, workload, steps, args, repeat, allocations=True)
                        # from the loaded model on: loading is the same in every variant, and on a GPU it reads
                        # the checkpoint through host memory
                        mb = allocated[model, workload, variant] = peaks["train_peak_mb"]
                        print(f"{Path(model).name:12s} {workload:9s} {variant:17s} allocated peak {mb:9.1f} MB "
                              f"x{mb / allocated[model, workload, 'lora']:.3f} (torch's CPU allocations from the "
                              f"loaded model on; loading it {peaks['load_peak_mb']:.1f} MB)", flush=True)
            if args.repeats > 1:
                for variant in variants[1:]:
                    walls, peaks, reused = (sorted(column) for column in zip(*ratios[model, workload, variant]))
                    print(f"{Path(model).name:12s} {workload:9s} {variant:17s} median of {args.repeats}: wall "
                          f"x{median(walls):.3f} (x{walls[0]:.3f} to x{walls[-1]:.3f})  peak x{median(peaks):.3f} "
                          f"(x{peaks[0]:.3f} to x{peaks[-1]:.3f})  with an earlier run's cache x{median(reused):.3f}",
                          flush=True)
    if not args.quick:
        memory = loss_memory(args.loss_chunk_size)
        print(f"loss memory at 2048 x 151936: naive {memory['naive']['extra_mb']:.0f} MB, chunked "
              f"(chunk {memory['chunk']}) "
              f"{memory['chunked']['extra_mb']:.0f} MB, ratio {memory['ratio']:.3f}", flush=True)

    def headline(workload: str) -> dict:
        walls, peaks, reused = zip(*ratios[models[-1], workload, DEFAULT_PATH])
        line = {"wall_ratio": round(median(walls), 4), "peak_mem_ratio": round(median(peaks), 4),
                "wall_ratio_cache_reused": round(median(reused), 4)}
        if allocated:
            line["alloc_peak_ratio"] = round(allocated[models[-1], workload, DEFAULT_PATH]
                                             / allocated[models[-1], workload, "lora"], 4)
        return line

    chunk = {} if args.loss_chunk_size is None else {"loss_chunk_size": args.loss_chunk_size}
    print(json.dumps({"model": models[-1], "path": DEFAULT_PATH, **chunk, **model_keys(args), **headline(workloads[0]),
                      "workloads": {w: headline(w) for w in workloads}}))


def note(result: dict, reused: float, with_generation: float) -> str:
    """What the wall ratio is made of: steps timed of the run's, the cache build (and the wall ratio of a later run
    that reads it), the top-k cache's KL error, the self-replay generation (and the wall ratio counting it)."""
    text = f"timed {result['timed_steps']} of {result['run_steps']} steps"
    if result["cache_seconds"]:
        text += f", cache built in {result['cache_seconds']:.1f} s (x{reused:.3f} when an earlier run built it)"
    if "topk_rel_error" in result:
        text += (f", top-k KL error {100 * result['topk_rel_error']:.2f}% ({result['topk_kl']:.5f} vs exact "
                 f"{result['exact_kl']:.5f})")
    if result["self_replay_seconds"]:
        text += (f", self-replay generated in {result['self_replay_seconds']:.1f} s (once per model; not counted: "
                 f"x{with_generation:.3f} with it)")
    return text


def model_keys(args) -> dict:
    return {"dtype": args.dtype, "load_in_4bit": args.load_in_4bit}


def run_variant(model: str, variant: str, workload: str, steps: int, args, repeat: int, allocations: bool = False
                ) -> dict:
    """`train_variant` in a child process of its own (so that its peak memory is its own)."""
    profile_file = None
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
        profile_file = str(Path(args.profile) / f"{Path(model).name}_{workload}_{variant}_{repeat}.txt")
    code = (f"import bench.overhead as b, json; "
            f"print(json.dumps(b.train_variant({model!r}, {variant!r}, {workload!r}, {steps}, {args.batch_size}, "
            f"{args.warmup_steps}, {profile_file!r}, {args.loss_chunk_size!r}, {args.replay_seq_length}, "
            f"{not args.no_padding_free}, {allocations}, {model_keys(args)!r})))")
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
