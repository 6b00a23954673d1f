"""Pass count and wall time of our batched scores against the reference implementation's design.

The reference computes the scores one prompt at a time: for each of 20 prompts, 10 mean-ablation samples,
5 forward+backward passes each (about a thousand passes per hop, ../shared/REFERENCE.md). Ours needs three
batched passes over all prompts (scores.py). Both are timed here, in the same run, on the same model, data
and weights: the reference design is replayed with our model (single-prompt forward+backward passes at W and
W'), on `--ref-prompts` prompts, and its total is extrapolated linearly to all prompts (said in the output).

    python bench/scores_passes.py [--model smollm2-135m] [--finetuned runs/first_hop] [--dataset first_hop]
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data                                   # noqa: E402
import scores as S                            # noqa: E402
from checkpoint_io.checkpoint import from_pretrained, load_tokenizer   # noqa: E402
from run_setup.progress import progress       # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="W: base checkpoint")
    ap.add_argument("--finetuned", default="runs/first_hop", help="W': finetuned checkpoint (train.py output)")
    ap.add_argument("--dataset", default="first_hop", help="dataset whose implications are scored")
    ap.add_argument("--ref-prompts", type=int, default=2, help="prompts replayed in the reference design")
    ap.add_argument("--samples", type=int, default=10, help="mean-ablation samples per prompt (reference: 10)")
    ap.add_argument("--passes", type=int, default=5, help="forward+backward passes per sample (reference: 5)")
    args = ap.parse_args()
    if not Path(args.finetuned).is_dir():
        sys.exit(f"error: no checkpoint at {args.finetuned}: run `python train.py --dataset {args.dataset}` first")
    torch.manual_seed(0)
    a = from_pretrained(args.model).requires_grad_(False)
    b = from_pretrained(args.finetuned).requires_grad_(False)
    tok = load_tokenizer(args.model)
    examples = data.load_dataset(args.dataset)["implications"]
    p = S.make_prompts(tok, examples)
    N = len(examples)

    S.linearized(a, b, p)                                  # warm-up
    t = time.perf_counter()
    S.linearized(a, b, p)
    ours = time.perf_counter() - t

    k = min(args.ref_prompts, N)
    t = time.perf_counter()
    n_passes = 0
    for i in progress(range(k), "reference design, one prompt at a time", unit="prompt"):
        one = p.subset([i])
        for _ in range(args.samples):
            for j in range(args.passes):
                S.record(a if j % 2 == 0 else b, one)      # forward + backward on one prompt
                n_passes += 1
    ref = (time.perf_counter() - t) * N / k
    ref_passes = n_passes * N // k

    print(f"model {args.model}, {N} prompts of {args.dataset}, torch threads {torch.get_num_threads()}")
    print(f"{'design':<44}{'passes':>8}{'wall s':>10}")
    print(f"{'ours: 3 batched passes (scores.linearized)':<44}{3:>8}{ours:>10.2f}")
    print(f"{'reference design, per prompt x sample':<44}{ref_passes:>8}{ref:>10.2f}"
          f"   (measured on {k} prompts, x{N / k:.0f})")
    print(f"speed-up: {ref / ours:.1f}x wall time, {ref_passes / 3:.0f}x fewer passes")


if __name__ == "__main__":
    main()
