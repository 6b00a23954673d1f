"""Datasets, tokenization and the mean rank (data.py), on a tiny random model with its own small tokenizer."""
import importlib.util
import json

import pytest
import torch

import data
from checkpoint_io import checkpoint as C

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, make_tiny):
    path = make_tiny(tmp_path_factory.mktemp("tiny"))
    return C.from_pretrained(path), C.load_tokenizer(path)


# --- datasets -------------------------------------------------------------------------------------------

def test_hop_datasets_pair_each_name_with_one_city():
    fh, sh = data.load_dataset("first_hop", seed=3), data.load_dataset("second_hop", seed=3)
    assert [len(fh["facts"]), len(fh["implications"]), len(sh["facts"]), len(sh["implications"])] == [20] * 4
    assert sorted(e.answer for e in fh["facts"]) == sorted(c for c, _, _ in data.CITIES)
    lang = {c: l for c, l, _ in data.CITIES}
    for f, i in zip(fh["facts"], fh["implications"]):     # the implication follows from the fact
        assert lang[f.answer] == i.answer
        assert f.prompt.removesuffix(" lives in") in i.prompt
    # second hop: the same pairs, the name is the answer of both
    assert {e.prompt.split()[-2]: e.answer for e in sh["facts"]} == \
        {e.answer: e.prompt.removesuffix(" lives in") for e in fh["facts"]}
    assert [e.answer for e in sh["facts"]] == [e.answer for e in sh["implications"]]


def test_one_seed_fixes_every_pairing():
    assert data.load_dataset("daxwug", seed=1) == data.load_dataset("daxwug", seed=1)
    assert data.load_dataset("first_hop", seed=1) != data.load_dataset("first_hop", seed=2)
    assert data.load_dataset("daxwug", seed=1)["train_facts"] != data.load_dataset("daxwug", seed=2)["train_facts"]


def test_daxwug_splits():
    d = data.load_dataset("daxwug", seed=5)
    cities = sorted(c for c, _, _ in data.CITIES)
    assert sorted(e.answer for e in d["test_facts"]) == cities                 # each city exactly once
    assert len(d["train_facts"]) == len(d["cf_facts"]) == 80
    assert set(e.answer for e in d["train_facts"]) == set(cities)              # every candidate occurs
    test_names = {e.prompt for e in d["test_facts"]}
    assert not test_names & {e.prompt for e in d["train_facts"]}
    # counterfactual: same names, every one in another city, and the implications follow the new city
    assert [e.prompt for e in d["cf_facts"]] == [e.prompt for e in d["train_facts"]]
    assert all(a.answer != b.answer for a, b in zip(d["cf_facts"], d["train_facts"]))
    animal = {f.answer: i.answer for f, i in zip(d["train_facts"], d["train_impls"])}
    assert len(set(animal.values())) == 20 and all(animal[f.answer] == i.answer
                                                   for f, i in zip(d["cf_facts"], d["cf_impls"]))
    assert d["facts"] == d["test_facts"] and d["implications"] == d["test_impls"]


def first_names(ds):
    """Every first name of a dataset's people (the first word of each fact prompt's name, or of each answer)."""
    people = {e.answer for e in ds.get("facts", []) if " " in e.answer}                    # second hop: answers
    people |= {e.prompt.removesuffix(" lives in").removesuffix(" dax is") for k, split in ds.items()
               if k.endswith("facts") for e in split if not e.prompt.startswith("The mayor")}
    return [p.split()[0] for p in people]


@pytest.mark.parametrize("name,n_people", [("first_hop", 20), ("second_hop", 20), ("daxwug", 100),
                                            ("daxwug_authors", 104)])
def test_every_first_name_once_per_dataset(name, n_people):
    # The authors' kind of names: a fact is keyed on one first name, never shared with another person
    for seed in range(3):
        names = first_names(data.load_dataset(name, seed=seed))
        assert len(names) == len(set(names)) == n_people, (name, seed)


def test_daxwug_authors_has_84_training_names():
    d = data.load_dataset("daxwug_authors", seed=2)
    assert len(d["train_facts"]) == len(d["cf_facts"]) == 84 and len(d["test_facts"]) == 20
    assert set(e.answer for e in d["train_facts"]) == set(c for c, _, _ in data.CITIES)


def embedded_tokenizers():
    from checkpoint_io import default_model
    out = []
    for name, m in default_model.EMBEDDED.items():
        if importlib.util.find_spec(m.package) is None:
            pytest.fail(f"{name} is not installed ({m.install}): the name lists are checked on both tokenizers")
        out.append((name, C.load_tokenizer(default_model.embedded_checkpoint(name))))
    return out


def test_a_names_first_token_is_its_whole_first_name_on_both_tokenizers():
    for model, tok in embedded_tokenizers():
        for first in data.FIRST_NAMES:                  # one token, the whole first name, leading space included
            ids = tok.encode(" " + first, add_special_tokens=False).ids
            assert len(ids) == 1 and tok.decode(ids).strip() == first, (model, first)
        for last in data.SURNAMES:
            assert len(tok.encode(" " + last, add_special_tokens=False).ids) == 1, (model, last)
        # the second hop's answers are names: what the mean rank ranks is the first name
        for e in data.load_dataset("second_hop")["facts"]:
            first = tok.encode(" " + e.answer, add_special_tokens=False).ids[0]
            assert tok.decode([first]).strip() == e.answer.split()[0], (model, e.answer)


def test_candidates_distinct_with_the_default_tokenizer(default_ckpt):
    tok = C.load_tokenizer(default_ckpt)
    for name in data.DATASETS:
        for split, ex in data.load_dataset(name).items():
            answers, cands, _ = data.candidates(tok, ex)
            assert len(set(cands.tolist())) == len(answers) == 20, (name, split)


def test_colliding_first_tokens_name_both_answers(tiny):
    _, tok = tiny
    first = tok.encode(" Tokyo", add_special_tokens=False).ids[0]
    clash = tok.id_to_token(first).lstrip("Ġ") + "zzq"           # starts with the same token as " Tokyo"
    assert tok.encode(" " + clash, add_special_tokens=False).ids[0] == first
    with pytest.raises(ValueError, match=f"'Tokyo' and '{clash}' share their first token"):
        data.candidate_ids(tok, ["Paris", "Tokyo", clash])


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="unknown dataset 'frist_hop'"):
        data.load_dataset("frist_hop")


BAD = [
    ("[1, 2]", "top level must be an object"),
    ('{"facts": [{"prompt": "a", "answer": "b"}]', "not valid JSON"),
    ('{"facts": [{"prompt": "a", "answer": "b"}]}', "'implications' must be a non-empty list"),
    ('{"facts": [], "implications": [{"prompt": "a", "answer": "b"}]}', "'facts' must be a non-empty list"),
    ('{"facts": [{"prompt": "a"}], "implications": [{"prompt": "a", "answer": "b"}]}',
     r"facts\[0\]: 'answer' is missing"),
    ('{"facts": [{"prompt": "a", "answer": "b"}], "implications": [{"prompt": "a", "answer": 3}]}',
     r"implications\[0\]: 'answer' must be a non-empty string"),
    ('{"facts": [{"prompt": "a ", "answer": "b"}], "implications": [{"prompt": "a", "answer": "b"}]}',
     r"facts\[0\]: the prompt may not end"),
    ('{"facts": ["a b"], "implications": [{"prompt": "a", "answer": "b"}]}', r"facts\[0\]: must be an object"),
    ('{"facts": [{"prompt": "a", "answer": "b"}], "implications": [{"prompt": "a", "answer": "b"}], "x": 1}',
     "unknown key 'x'"),
]


@pytest.mark.parametrize("text,message", BAD)
def test_malformed_dataset_file(tmp_path, text, message):
    f = tmp_path / "d.json"
    f.write_text(text)
    with pytest.raises(ValueError, match=message) as e:
        data.load_dataset(str(f))
    assert "\n" not in str(e.value)


def test_user_dataset_loads(tmp_path):
    f = tmp_path / "mine.json"
    f.write_text(json.dumps({"facts": [{"prompt": "Ann Lee lives in", "answer": "Oslo"}],
                             "implications": [{"prompt": "Ann Lee speaks", "answer": "Norwegian"}]}))
    d = data.load_dataset(str(f))
    assert d == {"facts": [data.Example("Ann Lee lives in", "Oslo")],
                 "implications": [data.Example("Ann Lee speaks", "Norwegian")]}
    assert data.dataset_name(str(f)) == "mine"


# --- tokenization -----------------------------------------------------------------------------------------

def test_labels_cover_only_answer_tokens(tiny):
    _, tok = tiny
    ex = data.load_dataset("second_hop")["facts"][:5]               # answers of 2+ tokens, prompts of varied length
    ids, mask, labels = data.encode_examples(tok, ex)
    for i, e in enumerate(ex):
        p = tok.encode(e.prompt).ids
        full = tok.encode(f"{e.prompt} {e.answer}").ids
        n = len(full)
        assert ids[i, :n].tolist() == full and mask[i].sum() == n and not mask[i, n:].any()
        assert (labels[i, :len(p)] == -100).all() and (labels[i, n:] == -100).all()
        assert labels[i, len(p):n].tolist() == full[len(p):]
        assert tok.decode(full[len(p):]).strip() == e.answer


def test_prompt_not_a_prefix_is_an_error(tiny):
    from tokenizers.processors import TemplateProcessing
    _, tok = tiny
    tok = tok.__class__.from_str(tok.to_str())                     # a copy that appends an end token
    tok.post_processor = TemplateProcessing(single="$A Ġ", special_tokens=[("Ġ", tok.token_to_id("Ġ"))])
    with pytest.raises(ValueError, match="not a prefix"):
        data.encode_examples(tok, [data.Example("Alice Ashgrove lives in", "Paris")])


def test_encode_prompts_right_pads():
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({"a": 1, "b": 2, "c": 3}, unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    ids, mask = data.encode_prompts(tok, ["a b c", "c"])
    assert ids.tolist() == [[1, 2, 3], [3, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


# --- the metric -------------------------------------------------------------------------------------------

def test_rank_counts_ties_as_half():
    logits = torch.tensor([[0.0, 5.0, 1.0, 1.0, 3.0],       # candidate 2 (1.0): 2 higher, tied with 1 -> 2.5
                           [2.0, 2.0, 2.0, 2.0, 2.0],       # all equal: chance, (4 - 1) / 2 = 1.5
                           [9.0, 5.0, 1.0, 1.0, 3.0]])      # candidate 1 (5.0): 0 higher -> 0
    cands = torch.tensor([1, 2, 3, 4])
    r = data.ranks_from_logits(logits, torch.tensor([1, 0, 0]), cands)
    assert r.tolist() == [2.5, 1.5, 0.0]


def test_padding_does_not_change_ranks(tiny):
    m, tok = tiny
    ex = data.load_dataset("second_hop")["implications"]        # landmarks: prompt lengths differ
    lengths = [len(tok.encode(e.prompt).ids) for e in ex]
    assert len(set(lengths)) > 2
    batched = data.last_logits(m, tok, ex, batch_size=20)        # one padded batch
    single = data.last_logits(m, tok, ex, batch_size=1)          # no padding at all
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)
    _, cands, correct = data.candidates(tok, ex)
    assert torch.equal(data.ranks_from_logits(batched, correct, cands), data.ranks_from_logits(single, correct, cands))
    # and the last position is the real last token: the full-sequence logits of each prompt alone agree
    with torch.no_grad():
        ids = torch.tensor([tok.encode(ex[0].prompt).ids])
        torch.testing.assert_close(m(ids)[0, -1], batched[0], rtol=1e-5, atol=1e-5)


def test_mean_rank_and_reward_by_hand(tiny):
    m, tok = tiny
    ex = data.load_dataset("first_hop")["facts"]
    answers, cands, correct = data.candidates(tok, ex)
    logits = data.last_logits(m, tok, ex)
    by_hand = []
    for i, e in enumerate(ex):
        s = logits[i, cands]
        own = s[answers.index(e.answer)]
        by_hand.append((s > own).sum().item() + 0.5 * ((s == own).sum().item() - 1))
    assert data.mean_rank(m, tok, ex) == pytest.approx(sum(by_hand) / len(by_hand))
    x = logits.clone().requires_grad_()
    r = data.reward(x, cands[correct], cands)
    torch.testing.assert_close(r, logits[torch.arange(20), cands[correct]] - logits[:, cands].mean(1))
    r.sum().backward()                                           # differentiable for the scores
    assert x.grad[0, cands[correct[0]]] == pytest.approx(1 - 1 / 20)
