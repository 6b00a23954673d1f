"""Our finetuning (train.py) against `transformers` doing the same batched finetuning, on CPU, in one run.

Same model, data, batches (the same shuffled order), learning-rate schedule, steps and trainable set (the
transformer blocks; embeddings and head frozen). Each contender lives in its own worker process, so that its
peak memory is its own; the workers take their training steps in lock-step, in rotating order, so that load
from other processes on a shared machine falls on all of them alike.

    python bench/train_speed.py [--dataset first_hop] [--epochs 8] [--hf-fused-adam] [--hf-keep-freed]
    python bench/train_speed.py --whole [--rounds 3]     # whole processes: `python train.py` against transformers

Contenders: ours in fp32, and ours with bf16 matmuls (fp32 master weights; bf16 weight copies refreshed after each
update, run_setup/precision.py), both with train.py's Adam inside backward (train.AdamInBackward); transformers in
fp32 and under bf16 autocast, with the Adam a plain `torch.optim.Adam(params, lr)` gives, stepped after backward
(`--hf-fused-adam`: the fused kernel too), and glibc's default malloc (`--hf-keep-freed`: train.py's setting too).
Every run first prints the CPU and its bf16 matrix instructions (AMX, AVX512-BF16 or neither).
Every contender owns its weights in memory before the clock starts, and builds its optimizer inside the first
timed step.
Prints the throughput ratio, both final ranks and peak memories, and this CPU's fp32 and bf16 matmul rates (what
bf16 can gain on the matmuls at most).

--whole times whole processes as a user runs them, start to exit: `python train.py --dataset first_hop`
(--dtype float32, its default, and bfloat16) against the same job written with `transformers` (hf_job: load the same
converted safetensors, train the blocks with torch.optim.Adam and the same schedule and batches, ranks before and
after every epoch, save_pretrained), in fp32 and under bf16 autocast; rounds in rotating order, medians and ratios.
"""
import argparse
import math
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):                                     # run as a file: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data                                                       # noqa: E402
import train                                                      # noqa: E402
from run_setup import precision, speedups                                        # noqa: E402
from run_setup.progress import progress                                          # noqa: E402
from checkpoint_io.checkpoint import from_pretrained, load_config, load_tokenizer, resolve   # noqa: E402


def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def matmul_rates(threads, shapes):
    """GFLOP/s of this CPU's fp32 and bf16 (M, K, N) matmuls, best of 10: what bf16 can gain on matmuls at most."""
    torch.set_num_threads(threads)
    rates = {}
    for M, K, N in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            a, b = torch.randn(M, K, dtype=dtype), torch.randn(K, N, dtype=dtype)
            times = []
            for _ in range(13):
                t0 = time.perf_counter()
                a @ b
                times.append(time.perf_counter() - t0)
            best = min(times[3:])                                 # 3 warm-up calls, then the best of 10
            rates[(M, K, N), dtype] = 2 * M * K * N / best / 1e9
    return rates


def worker(kind, path, ds_name, seed, lr, hf_fused, hf_keep, threads, conn):
    """Load one contender, then serve ("step", rows, lr) / ("eval",) / ("mem",) requests until ("stop",)."""
    torch.set_num_threads(threads)
    hf = kind.startswith("transformers")
    if not hf or hf_keep:
        speedups.keep_freed_memory()                              # as train.py does on CPU
    torch.manual_seed(seed)
    tok = load_tokenizer(path)
    ds = data.load_dataset(ds_name, seed=seed)
    ids, mask, labels = data.encode_examples(tok, ds["facts"])    # (N, T) each
    if hf:
        import transformers
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    else:
        model = from_pretrained(path)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("model.layers."))        # the same trainable set: the blocks
    params = [p for p in model.parameters() if p.requires_grad]
    if hf:
        # transformers maps the safetensors file; ours copies it while loading. Copy here too (untimed), or the
        # first optimizer step pays copy-on-write faults on every trained weight: a loading cost, not training.
        with torch.no_grad():
            for p in params:
                p.data = p.data.clone()
    rss_loaded = rss_mib()                                        # before any optimizer state
    bf16 = kind in ("ours-bf16", "transformers-bf16")
    copies = precision.Copies(model) if kind == "ours-bf16" else None   # as train.py: bf16 weight copies

    def make_optimizer():                                         # inside the first timed step: its state is
        if hf:                                                    # allocated there (transformers' Adam: lazily)
            return torch.optim.Adam(params, lr=lr, fused=True if hf_fused else None)
        return train.AdamInBackward(params, lr, after_step=copies and copies.refresh)   # as train.py

    opt = None
    head = copies and copies.head                                 # as train.py
    amp = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=kind == "transformers-bf16")
    conn.send(("ready", rss_loaded))
    while True:
        msg = conn.recv()
        if msg[0] == "step":
            _, rows, step_lr = msg
            rows = torch.tensor(rows)
            T = int(mask[rows].sum(1).max())
            b = ids[rows, :T], mask[rows, :T], labels[rows, :T]
            t0 = time.perf_counter()
            if opt is None:
                opt = make_optimizer()
            model.train()
            if hf:
                for g in opt.param_groups:
                    g["lr"] = step_lr
                with amp():                                       # transformers-bf16: bf16 autocast
                    loss = model(input_ids=b[0], attention_mask=b[1], labels=b[2]).loss   # head at every position
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            else:
                opt.start_step(step_lr)
                with amp():
                    loss = train.answer_loss(model, *b, head=head)
                loss.backward()                                   # Adam steps inside
            conn.send((time.perf_counter() - t0, loss.item()))
        elif msg[0] == "eval":
            model.eval()
            out = {}
            for split in ("facts", "implications"):
                ex = ds[split]
                if hf:
                    _, cands, correct = data.candidates(tok, ex)
                    pids, pmask = data.encode_prompts(tok, [e.prompt for e in ex])
                    with torch.no_grad(), amp():
                        logits = model(input_ids=pids, attention_mask=pmask).logits.float()  # (N, T, V)
                    last = logits[torch.arange(len(ex)), pmask.sum(1) - 1]                   # (N, V)
                    out[split] = data.ranks_from_logits(last, correct, cands).mean().item()
                else:
                    with precision.fp32(model):                   # as train.evaluate: fp32 ranks
                        out[split] = data.mean_rank(model, tok, ex)
            conn.send(out)
        elif msg[0] == "mem":
            conn.send((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, rss_loaded))
        else:
            return


def hf_job(path, dataset, amp, out, epochs=8, batch_size=8, lr=3e-4, seed=0):
    """train.py's default job written with `transformers` as its users would: AutoModelForCausalLM in fp32 (its
    matmuls under bf16 autocast with `amp`), the blocks trained by torch.optim.Adam with train.py's schedule and
    shuffling, the loss over every position (labels -100 but on the answer), the ranks of the facts and the
    implications before and after every epoch, then save_pretrained."""
    import transformers
    t0 = time.time()
    tok = load_tokenizer(path)
    ds = data.load_dataset(dataset, seed=seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    params = [p for n, p in model.named_parameters() if n.startswith("model.layers.")]
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("model.layers."))
    ids, mask, labels = data.encode_examples(tok, ds["facts"])    # (N, T) each
    N = len(ids)
    total = epochs * math.ceil(N / batch_size)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: train.lr_factor(step, total))
    gen = torch.Generator().manual_seed(seed)
    amp_ctx = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp)

    def ranks():
        model.eval()
        out = []
        for split in ("facts", "implications"):
            ex = ds[split]
            _, cands, correct = data.candidates(tok, ex)
            pids, pmask = data.encode_prompts(tok, [e.prompt for e in ex])
            with torch.no_grad(), amp_ctx():
                logits = model(input_ids=pids, attention_mask=pmask).logits.float()     # (N, T, V)
            last = logits[torch.arange(len(ex)), pmask.sum(1) - 1]                         # (N, V)
            out.append(data.ranks_from_logits(last, correct, cands).mean().item())
        return out

    r = ranks()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(N, generator=gen)
        for i in range(0, N, batch_size):
            rows = perm[i:i + batch_size]
            T = int(mask[rows].sum(1).max())
            with amp_ctx():
                loss = model(input_ids=ids[rows, :T], attention_mask=mask[rows, :T], labels=labels[rows, :T]).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        r = ranks()
    model.save_pretrained(out)
    print(f"hf_job final fact / impl rank {r[0]:.2f} / {r[1]:.2f}; {time.time() - t0:.1f} s")


def whole(args):
    """Whole processes, start to exit, in rounds of rotating order: of ours (fp32 and bf16) and hf_job (fp32 and bf16
    autocast), the --contenders. Prints each contender's median wall time and the ratios among them."""
    import subprocess
    import tempfile
    py, root = sys.executable, Path(__file__).resolve().parent.parent
    threads = ["--threads", str(args.threads)]
    out = Path(tempfile.mkdtemp(prefix="train_speed_"))
    every = {"ours-bf16": [py, "train.py", "--dataset", args.dataset, "--dtype", "bfloat16", "--overwrite", *threads],
             "ours-fp32": [py, "train.py", "--dataset", args.dataset, "--dtype", "float32", "--overwrite", *threads],
             "transformers": [py, "bench/train_speed.py", "--hf-job", "fp32", "--dataset", args.dataset, *threads],
             "transformers-bf16": [py, "bench/train_speed.py", "--hf-job", "bf16", "--dataset", args.dataset,
                                   *threads]}
    kinds = {k: every[k] for k in every if k in args.contenders.split(",")}     # --contenders, in this order
    times = {k: [] for k in kinds}
    names = list(kinds)
    for r in range(args.rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            res = subprocess.run(kinds[k] + ["--out", str(out / k)], cwd=root, capture_output=True, text=True)
            times[k].append(time.perf_counter() - t0)
            if res.returncode:
                sys.exit(f"error: {k} failed:\n{res.stderr[-2000:]}")
            last = [line for line in res.stdout.splitlines() if "rank" in line][-1:]
            print(f"round {r} {k:>18} {times[k][-1]:6.1f} s  {last[0].strip() if last else ''}", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k in kinds:
        print(f"{k:>18}: median {med[k]:6.1f} s (runs {', '.join(f'{t:.1f}' for t in times[k])})")
    for k in ("ours-bf16", "ours-fp32"):
        for peer in ("transformers", "transformers-bf16", "ours-fp32"):
            if k in med and peer in med and peer != k:
                print(f"{k} against {peer}: {med[peer] / med[k]:.2f}x (whole processes, medians)")


CONTENDERS = ("ours-fp32", "ours-bf16", "transformers", "transformers-bf16")


def contender_list(text):
    """--contenders: a comma-separated subset of CONTENDERS, or a one-line error naming them."""
    bad = [k for k in text.split(",") if k not in CONTENDERS]
    if bad or not text:
        raise argparse.ArgumentTypeError(f"unknown contender {bad[0] if bad else text!r}: choose from "
                                         f"{', '.join(CONTENDERS)}")
    return text


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="checkpoint directory or the embedded default")
    p.add_argument("--dataset", default="first_hop", help="dataset whose facts are trained")
    p.add_argument("--epochs", type=int, default=8, help="epochs")
    p.add_argument("--batch-size", type=int, default=8, help="batch size")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (warmup + linear decay)")
    p.add_argument("--seed", type=int, default=0, help="dataset pairing and shuffling")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads per worker")
    p.add_argument("--hf-fused-adam", action="store_true", help="give transformers our fused Adam as well")
    p.add_argument("--hf-keep-freed", action="store_true",
                   help="give transformers our malloc setting as well (speedups.keep_freed_memory)")
    p.add_argument("--contenders", default=",".join(CONTENDERS), type=contender_list,
                   help=f"comma-separated subset of {', '.join(CONTENDERS)} (with --whole too)")
    p.add_argument("--whole", action="store_true", help="time whole processes instead (module docstring)")
    p.add_argument("--rounds", type=int, default=3, help="--whole: rounds of the contenders' processes")
    p.add_argument("--hf-job", choices=["fp32", "bf16"], help="run hf_job alone (what --whole launches)")
    p.add_argument("--out", default=None, help="--hf-job: where save_pretrained writes")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    isa = precision.cpu_isa()
    print(f"CPU: {precision.cpu_name()}; bf16 matrix instructions: {isa}; torch capability "
          f"{torch.backends.cpu.get_cpu_capability()}; default --dtype {precision.default_dtype('cpu')}", flush=True)
    if args.hf_job:
        return hf_job(str(resolve(args.model)), args.dataset, args.hf_job == "bf16", args.out, args.epochs,
                      args.batch_size, args.lr, args.seed)
    if args.whole:
        return whole(args)
    path = str(resolve(args.model))
    kinds = args.contenders.split(",")
    ctx = mp.get_context("spawn")
    conns, procs = {}, {}
    for k in kinds:
        conns[k], b = ctx.Pipe()
        procs[k] = ctx.Process(target=worker, args=(k, path, args.dataset, args.seed, args.lr, args.hf_fused_adam,
                                                    args.hf_keep_freed, args.threads, b))
        procs[k].start()

    def answer(k):
        """The worker's reply; a worker that died (its traceback is printed above) ends the run, not a hang."""
        while not conns[k].poll(1):
            if not procs[k].is_alive():
                for pr in procs.values():
                    pr.kill()
                sys.exit(f"error: the {k} worker died (exit code {procs[k].exitcode}); see its traceback above")
        return conns[k].recv()

    for k in kinds:                                               # one at a time: loading is not timed
        print(f"loading {k} ...", file=sys.stderr, flush=True)
        answer(k)
    facts = data.load_dataset(args.dataset, seed=args.seed)["facts"]
    N = len(facts)
    steps_per_epoch = math.ceil(N / args.batch_size)
    total = args.epochs * steps_per_epoch
    gen = torch.Generator().manual_seed(args.seed)
    times = {k: [] for k in kinds}
    losses = {k: [] for k in kinds}
    step, bar = 0, progress(desc=f"training steps, {len(kinds)} contenders in turn", total=total, unit="step")
    for epoch in range(args.epochs):
        perm = torch.randperm(N, generator=gen).tolist()
        for i in range(0, N, args.batch_size):
            lr = args.lr * train.lr_factor(step, total)
            order = kinds[step % len(kinds):] + kinds[:step % len(kinds)]   # rotate who goes first
            for k in order:
                conns[k].send(("step", perm[i:i + args.batch_size], lr))
                t, loss = answer(k)
                times[k].append(t)
                losses[k].append(loss)
            step += 1
            bar.update()
    bar.close()
    print("evaluating the ranks ...", file=sys.stderr, flush=True)
    fact_mask = data.encode_examples(load_tokenizer(path), facts)[1]                       # (N, T)
    tokens = int(fact_mask.sum()) * args.epochs                                              # real tokens
    print(f"{args.dataset}: {total} steps of batch {args.batch_size}, {tokens} training tokens; "
          f"{args.threads} threads per worker; transformers' Adam: {'fused' if args.hf_fused_adam else 'default'}, "
          f"its malloc: {'ours (keep_freed_memory)' if args.hf_keep_freed else 'default'}")
    print(f"{'contender':>13} {'total s':>8} {'first step s':>13} {'median step s':>14} {'tokens/s':>9} "
          f"{'final loss':>11} {'fact rank':>10} {'impl rank':>10} {'peak MiB':>9} {'train MiB':>10}")
    result = {}
    for k in kinds:
        conns[k].send(("eval",))
        ranks = answer(k)
        conns[k].send(("mem",))
        peak, loaded = answer(k)
        result[k] = (sum(times[k]), statistics.median(times[k]))
        print(f"{k:>13} {sum(times[k]):8.2f} {times[k][0]:13.3f} {statistics.median(times[k]):14.3f} "
              f"{tokens / sum(times[k]):9.0f} {losses[k][-1]:11.4f} {ranks['facts']:10.2f} "
              f"{ranks['implications']:10.2f} {peak:9.0f} {peak - loaded:10.0f}")
        conns[k].send(("stop",))
    for pr in procs.values():
        pr.join()
    for hf in ("transformers", "transformers-bf16"):
        for k in kinds:
            if hf in result and not k.startswith("transformers"):
                print(f"throughput {k} / {hf}: {result[hf][0] / result[k][0]:.2f}x total, "
                      f"{result[hf][1] / result[k][1]:.2f}x median step")
    # The machine's own matmul rates, after the workers (the machine is quiet): a full batch through an MLP
    # projection (B T, D) x (D, F), and a large square one, near the peak rate.
    cfg = load_config(Path(path))
    projection = (args.batch_size * fact_mask.shape[1], cfg.dim, cfg.ffn_dim)
    shapes = [projection, (1024, 1024, 1024)]
    rates = matmul_rates(args.threads, shapes)
    for shape in shapes:
        f32, b16 = rates[shape, torch.float32], rates[shape, torch.bfloat16]
        print(f"matmul {'x'.join(map(str, shape))} on {args.threads} threads: fp32 {f32:.0f} GFLOP/s, "
              f"bf16 {b16:.0f} GFLOP/s ({b16 / f32:.1f}x)")
    print("peak MiB: the worker's peak resident memory (model, optimizer state, activations); "
          "train MiB: peak minus the resident memory after loading. transformers' peak also holds the file-mapped "
          "pages of the block weights it was given copies of (about 0.4 GiB for the default model): compare train MiB")


if __name__ == "__main__":
    main()
