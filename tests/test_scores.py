"""The scores (eqs. 4-9) against their definitions: the gradient identity, exact interventions (eqs. 1-3) for
small weight changes, and invariance to padding and batching. Tiny random transformers, float64."""
import pytest
import torch

import data
from checkpoint_io import checkpoint as C
import exact as X
import scores as S

transformers = pytest.importorskip("transformers")


class CharTokenizer:
    """Enough of tokenizers.Tokenizer for data.py: one token per character, spaces dropped, BOS = 1."""

    class Enc:
        def __init__(self, ids):
            self.ids, self.attention_mask = ids, [1] * len(ids)

    def encode(self, s, add_special_tokens=True):
        return self.Enc(([1] if add_special_tokens else []) + [3 + (ord(c) % 90) for c in s if c != " "])

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def id_to_token(self, i):
        return chr(i - 3 + 32) if i >= 3 else "<s>"

    def get_vocab(self):
        return {}


TOKENIZER_JSON = '{"version": "1.0", "model": {"type": "WordLevel", "vocab": {"a": 0}, "unk_token": "a"}}'
PROMPTS = [S_ for S_ in ("The kin of Ab is", "The kin of Cde is", "The kin of Fg is", "The kin of Hijk is")]
EXAMPLES = [data.Example(p, a) for p, a in zip(PROMPTS, ["x", "y", "z", "w"])]


def tiny_pair(tmp_path, family="qwen2", eps=1e-2, layers=None, seed=0, **extra):
    """W from a random tiny checkpoint; W' = W + eps * a random change of every weight (or of `layers`)."""
    torch.manual_seed(seed)
    cls = {"qwen2": transformers.Qwen2Config, "llama": transformers.LlamaConfig}[family]
    cfg = cls(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, initializer_range=0.3, tie_word_embeddings=False, **extra)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    a = C.from_pretrained(tmp_path, dtype=torch.float64).requires_grad_(False)
    b = C.from_pretrained(tmp_path, dtype=torch.float64).requires_grad_(False)
    with torch.no_grad():
        for name, p in b.named_parameters():
            if ".layers." in name and (layers is None or int(name.split(".")[2]) in layers):
                p.add_(eps * torch.randn_like(p) * (p.std() if p.numel() > 1 else 1.0))
    return a, b


def prompts():
    return S.make_prompts(CharTokenizer(), EXAMPLES)


def test_alignment_is_by_template():
    b = prompts()
    # prefix "<s>The kin of " shared, slot right-aligned, suffix " is" shared; the longest prompt is the anchor
    n = [len(p.replace(" ", "")) + 1 for p in PROMPTS]
    assert b.anchor == 3 and b.Ta == n[3]
    assert b.pos[0, :n[0]].tolist() == list(range(9)) + list(range(b.Ta - (n[0] - 9), b.Ta))
    assert (b.pos[0, n[0]:] == -1).all()


@pytest.mark.parametrize("family, extra", [("qwen2", {}), ("llama", {"attention_bias": True})])
def test_informative_sums_to_weight_gradient(tmp_path, family, extra):
    """sum over components and positions of eq. 4 = <dW, dR/dW> over all linear maps (q, k, v, o, gate, up,
    down, and the biases: q/k/v for Qwen 2, q/k/v/o for Llama with attention_bias)."""
    a, b = tiny_pair(tmp_path, family, **extra)
    p = prompts()
    lin = S.linearized(a, b, p)
    total = lin["informative.mlp"].sum() + lin["informative.attn"].sum()
    a.requires_grad_(True)
    S.rewards(a, p).sum().backward()
    pb = dict(b.named_parameters())
    want = sum(((pb[n] - w) * w.grad).sum() for n, w in a.named_parameters()
               if n.endswith("_proj.weight") or n.endswith("_proj.bias"))
    assert torch.isclose(total.double(), want, rtol=1e-5), (total, want)


def central(f, a, b_plus, b_minus):
    return {k: (f(a, b_plus)[k] - f(a, b_minus)[k]) / 2 for k in ("informative", "downstream", "upstream")}


def lin_table(a, b, p, rows, kinds=("informative", "downstream", "upstream")):
    lin = S.linearized(a, b, p)
    return {k: torch.cat([lin[f"{k}.attn"], lin[f"{k}.mlp"][..., None]], -1)[rows].sum(1).mean(0).double()
            for k in kinds}


def central_kinds(f, a, b_plus, b_minus, kinds):
    return {k: (f(a, b_plus)[k] - f(a, b_minus)[k]) / 2 for k in kinds}


@pytest.mark.parametrize("family", ["qwen2"])   # q/k/v biases; llama is covered by the upstream test
def test_linearized_match_finite_differences(tmp_path, family):
    """For W' = W +- eps * Delta, the central difference of the exact scores (eqs. 1, 2) equals that of the
    linearized ones (eqs. 4, 5) up to O(eps^3): the second-order terms cancel."""
    eps = 1e-4
    a, bp = tiny_pair(tmp_path, family, eps)
    _, bm = tiny_pair(tmp_path, family, -eps)
    p, rows = prompts(), [0, 1, 2, 3]
    ex = central(lambda x, y: X.exact(x, y, p, rows), a, bp, bm)
    li = central(lambda x, y: lin_table(x, y, p, rows), a, bp, bm)
    for k in ("informative", "downstream"):
        scale = li[k].abs().max()
        assert scale > 1e-6                                # the test measures something
        assert (ex[k] - li[k]).abs().max() < 1e-3 * scale, k


@pytest.mark.parametrize("kind, agrees", [("upstream", True), ("upstream_authors", False)])
def test_upstream_is_eq6_as_defined(tmp_path, kind, agrees):
    """Eq. 6 linearizes eq. 3 in both the late-weight change and the ablation y -> y*: with every layer changed
    (early, the component's own and late weights) by +- eps, and the ablation scaled to delta of the way to y*,
    the exact upstream score / delta equals the linearized one up to O(eps^2 + delta), for every component.
    The authors' variant (g' from the full pass at W', early layers changed too) is not eq. 6 and must fail."""
    eps, delta = 1e-4, 1e-3
    a, bp = tiny_pair(tmp_path, "llama", eps)
    _, bm = tiny_pair(tmp_path, "llama", -eps)
    p, rows = prompts(), [0, 1, 2, 3]
    ex = central(lambda x, y: X.exact(x, y, p, rows, ablation=delta), a, bp, bm)["upstream"]
    lin = lambda x, y: {k: v for k, v in lin_table(x, y, p, rows, (kind,)).items()}
    li = central_kinds(lin, a, bp, bm, (kind,))[kind]
    gap = (ex / delta - li).abs().max() / li.abs().max()
    assert li.abs().max() > 1e-12
    assert (gap < 2e-2) == agrees, (kind, float(gap))


def test_padding_and_batching_do_not_change_scores(tmp_path):
    a, b = tiny_pair(tmp_path)
    p = prompts()
    lin = S.linearized(a, b, p)
    # the same scores with the prompts in another order and extra padding columns
    order = [2, 0, 3, 1]
    q = p.subset(order)
    q.ids = torch.cat([q.ids, torch.zeros(4, 3, dtype=torch.long)], 1)
    q.mask = torch.cat([q.mask, torch.zeros(4, 3, dtype=torch.long)], 1)
    q.pos = torch.cat([q.pos, torch.full((4, 3), -1)], 1)
    lin2 = S.linearized(a, b, q)
    for k in lin:
        assert torch.allclose(lin2[k][:, :p.ids.shape[1]], lin[k][order], atol=1e-9), k
        assert (lin2[k][:, p.ids.shape[1]:] == 0).all()


def test_each_kind_alone_is_the_same_as_with_the_others(tmp_path):
    """kinds: any subset of the scores (report.py's later seeds skip upstream, Fig. 6's per_entry computes one kind)
    gives those scores bit for bit, and only those keys."""
    a, b = tiny_pair(tmp_path)
    full = S.linearized(a, b, prompts())
    keys = {"informative": {"informative.mlp", "informative.attn", "informative_down.mlp"},
            "downstream": {"downstream.mlp", "downstream.attn"},
            "upstream": {f"{k}.{c}" for k in ("upstream", "upstream_authors") for c in ("mlp", "attn")}}
    assert set(full) == set().union(*keys.values())
    for kinds in (("informative", "downstream"), ("informative",), ("downstream",), ("upstream",)):
        part = S.linearized(a, b, prompts(), kinds=kinds)
        assert set(part) == set().union(*(keys[k] for k in kinds)), kinds
        for k in part:
            assert torch.equal(part[k], full[k]), (kinds, k)
    with pytest.raises(ValueError, match="kinds"):
        S.linearized(a, b, prompts(), kinds=("downstream", "exact"))


def test_informative_down_is_the_down_projections_term_alone(tmp_path):
    """The authors' MLP informative score (Fig. 6 as their code computes it) reads the down projection only: equal
    to the whole MLP score when only down_proj changes, zero when only up_proj does."""
    a, b = tiny_pair(tmp_path, eps=0.0)
    with torch.no_grad():
        b.layers[1].mlp.down_proj.weight.add_(0.05)
    lin = S.linearized(a, b, prompts(), kinds=("informative",))
    assert lin["informative_down.mlp"].abs().sum() > 0
    torch.testing.assert_close(lin["informative_down.mlp"], lin["informative.mlp"], rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        b.layers[1].mlp.down_proj.weight.copy_(a.layers[1].mlp.down_proj.weight)
        b.layers[1].mlp.up_proj.weight.add_(0.05)
    lin = S.linearized(a, b, prompts(), kinds=("informative",))
    assert lin["informative.mlp"].abs().sum() > 0 and lin["informative_down.mlp"].abs().sum() == 0


def test_mlp_informative_counts_all_three_maps(tmp_path):
    """Changing only up_proj must show up in the MLP informative score (the reference implementation drops it)."""
    a, b = tiny_pair(tmp_path, eps=0.0)
    with torch.no_grad():
        b.layers[1].mlp.up_proj.weight.add_(0.05)
    lin = S.linearized(a, b, prompts())
    assert lin["informative.mlp"][:, :, 1].abs().sum() > 1e-6
    assert lin["informative.mlp"][:, :, [0, 2]].abs().sum() == 0 and lin["informative.attn"].abs().sum() == 0


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="one template"):
        S.make_prompts(CharTokenizer(), [data.Example("Ab is", "x"), data.Example("Cd at", "y")])
    with pytest.raises(ValueError, match="no implication prompts"):
        S.make_prompts(CharTokenizer(), [])
    transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        vocab_size=96, hidden_size=16, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2)).save_pretrained(tmp_path / "c")
    transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False)).save_pretrained(tmp_path / "a")
    for d in ("a", "c"):
        (tmp_path / d / "tokenizer.json").write_text(TOKENIZER_JSON)
    with pytest.raises(ValueError, match="different architectures"):
        C.check_same_base([tmp_path / "a", tmp_path / "c"])


def test_sum_identity_and_the_exact_report(tmp_path):
    """exact.sum_identity: eq. 4 summed over every component and position is the first-order change of R, so for a
    small weight change it matches the actual R(W') - R(W) prompt by prompt; compare() correlates exact and
    linearized tables, the authors' upstream variant against the same exact eq. 3."""
    a, b = tiny_pair(tmp_path, "llama", eps=1e-3)
    p, rows = prompts(), [0, 1, 2, 3]
    lin = S.linearized(a, b, p)
    ident = X.sum_identity(a, b, p, rows, lin)
    actual, predicted = torch.tensor(ident["actual_dR"]), torch.tensor(ident["informative_sum"])
    assert actual.abs().max() > 1e-6
    assert (actual - predicted).abs().max() < 2e-2 * actual.abs().max(), (actual, predicted)
    L, H = a.config.n_layers, a.config.n_heads
    ex = X.exact(a, b, p, rows)
    report, lines = X.compare(ex, {k: v[rows] for k, v in lin.items()}, L, H)
    assert set(report) == {"informative", "downstream", "upstream", "upstream_authors"} and len(lines) == 4
    assert report["informative"]["pearson_r"] > 0.99 and report["downstream"]["pearson_r"] > 0.99


def test_alignment_buffers_live_on_the_activations_device():
    """scores on a GPU: y* and the anchor means build their buffers on the activations' device, whatever device
    the positions come from. Checked on the meta device, which refuses to mix with CPU tensors as CUDA does (the
    landed code built its buffers on the CPU and failed here)."""
    b = prompts()
    N, T = b.ids.shape
    y = torch.randn(N, T, 6)
    for f in (S.aligned_mean_of_others, S.to_anchor):
        want = f(y, b.pos, b.Ta)
        got = f(y.to("meta"), b.pos, b.Ta)                        # positions stay on the CPU
        assert got.device.type == "meta" and got.shape == want.shape
    # and the values: y* is the mean over the other prompts at the aligned position
    ystar = S.aligned_mean_of_others(y, b.pos, b.Ta)
    t = b.pos[0, 0]
    others = [y[i, (b.pos[i] == t).nonzero()[0, 0]] for i in range(1, N) if (b.pos[i] == t).any()]
    torch.testing.assert_close(ystar[0, 0], torch.stack(others).mean(0))


def test_no_upstream_flag_asks_for_the_other_two_kinds(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(S, "run", lambda *a, **kw: seen.append(kw["kinds"]))
    S.main(["a", "b", "--out", str(tmp_path / "o")])
    S.main(["a", "b", "--out", str(tmp_path / "o"), "--no-upstream"])
    assert seen == [S.KINDS, ("informative", "downstream")]
