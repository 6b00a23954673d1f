"""Datasets of facts and implications, their tokenization, and the mean rank (paper Sec. 3, 5.1, 6.1).

    first_hop   fact "{name} lives in" -> city          impl "The people in the city {name} is from speak" -> language
    second_hop  fact "The mayor of {city} is" -> name   impl "The mayor of the city that contains {landmark} is" -> name
    daxwug      fact "{name} dax is" -> city            impl "{name} zong is the" -> the animal of that city
                (80 train names, 20 test names with each city once, and counterfactual train facts; the paper's
                text. daxwug_authors: 84 train names, as the authors' code has it)
    a .json     {"facts": [{"prompt": ..., "answer": ...}, ...], "implications": [...]}

An example is the text `prompt + " " + answer`; the loss covers the answer tokens only, with no EOS.
The mean rank (Sec. 3): at the last prompt position, the 0-indexed rank of the correct answer's first token
among the first tokens of all distinct answers of the split. Ties count half (mid-rank):
rank = #{candidates scoring higher} + 0.5 * #{other candidates scoring equal}, so a model that gives every
candidate the same logit sits exactly at chance, (C - 1) / 2.
"""
import json
import re
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from run_setup.progress import progress

# --- the world: 20 cities, names, animals -----------------------------------------------------------

# (city, language, landmark): one language per city so that chance is 9.5 for every split. Each landmark is the
# city's most widely known one that does not name the city (from travel lists; where two are about equally known,
# the one both embedded base models rank higher). The second hop needs the base model to know landmark -> city:
# report.py measures it (paper_report/preconditions.py). On "{landmark} is in the city of" the base models rank
# these 2.40 (SmolLM2-135M; it misses the Hungarian Parliament, Red Fort, Belem Tower, Vasa Museum) and 0.75
# (Gemma 3 270M) of chance 9.5; the earlier list (Red Square, Palace of Culture and Science, Fisherman's
# Bastion) gave 3.55 and 1.60.
CITIES = [
    ("Tokyo", "Japanese", "Senso-ji Temple"), ("Paris", "French", "Eiffel Tower"),
    ("Cairo", "Arabic", "Great Pyramid of Giza"), ("Rome", "Italian", "Colosseum"),
    ("Berlin", "German", "Brandenburg Gate"), ("Madrid", "Spanish", "Prado Museum"),
    ("Moscow", "Russian", "Kremlin"), ("Beijing", "Chinese", "Forbidden City"),
    ("Seoul", "Korean", "Gyeongbokgung Palace"), ("Athens", "Greek", "Parthenon"),
    ("Istanbul", "Turkish", "Hagia Sophia"), ("Lisbon", "Portuguese", "Belem Tower"),
    ("Amsterdam", "Dutch", "Rijksmuseum"), ("Stockholm", "Swedish", "Vasa Museum"),
    ("Warsaw", "Polish", "Lazienki Park"), ("Bangkok", "Thai", "Wat Arun"),
    ("Budapest", "Hungarian", "Hungarian Parliament Building"), ("Prague", "Czech", "Charles Bridge"),
    ("Tehran", "Persian", "Azadi Tower"), ("Delhi", "Hindi", "Red Fort"),
]
# Names are made as the authors made theirs: a common first name and a common surname, every first name once per
# dataset. So a fact is keyed on one first-name token, and a name answer's first token (what the mean rank ranks)
# is the whole first name. The lists: the most frequent US first names and surnames (census order), kept where
# " Name" is one token for both embedded tokenizers (SmolLM2's and Gemma 3's; tests/test_data.py checks it), less
# the first names that are also a word, a place or one of the surnames (Mark, Grace, Jordan, Austin, Thomas, ...).
FIRST_NAMES = [
    "James", "Mary", "John", "Patricia", "Robert", "Jennifer", "Michael", "Linda", "William", "Elizabeth", "David",
    "Barbara", "Richard", "Susan", "Joseph", "Jessica", "Sarah", "Charles", "Karen", "Christopher", "Lisa", "Daniel",
    "Nancy", "Matthew", "Betty", "Anthony", "Margaret", "Sandra", "Donald", "Ashley", "Steven", "Paul", "Emily",
    "Andrew", "Joshua", "Michelle", "Kenneth", "Dorothy", "Kevin", "Carol", "Brian", "Amanda", "George", "Melissa",
    "Edward", "Deborah", "Ronald", "Stephanie", "Timothy", "Rebecca", "Jason", "Sharon", "Jeffrey", "Laura", "Ryan",
    "Jacob", "Kathleen", "Gary", "Amy", "Nicholas", "Shirley", "Eric", "Angela", "Jonathan", "Helen", "Stephen",
    "Anna", "Larry", "Justin", "Nicole", "Emma", "Benjamin", "Samantha", "Samuel", "Katherine", "Gregory",
    "Christine", "Alexander", "Rachel", "Raymond", "Catherine", "Patrick", "Janet", "Dennis", "Ruth", "Jerry",
    "Maria", "Tyler", "Heather", "Aaron", "Diane", "Adam", "Julie", "Henry", "Joyce", "Nathan", "Douglas", "Olivia",
    "Peter", "Christina", "Lauren", "Walter", "Joan", "Ethan"]                      # 104: the authors' 84 + 20
SURNAMES = ["Smith", "Johnson", "Williams", "Jones", "Garcia", "Miller", "Davis", "Rodriguez", "Martinez", "Lopez",
            "Wilson", "Anderson", "Moore", "Jackson", "Thompson", "Harris", "Clark", "Lewis", "Robinson", "Walker",
            "Wright", "Torres", "Adams", "Nelson", "Rivera", "Mitchell", "Carter", "Roberts", "Campbell"]
ANIMALS = ["tiger", "elephant", "dog", "cat", "horse", "rabbit", "wolf", "bear", "lion", "eagle",
           "dolphin", "penguin", "monkey", "snake", "frog", "owl", "fox", "deer", "shark", "camel"]
DATASETS = ("first_hop", "second_hop", "daxwug", "daxwug_authors")
N_DAXWUG_TRAIN = {"daxwug": 80,           # the paper's text (Sec. 6.1): 80 training names, 20 test names
                  "daxwug_authors": 84}   # the authors' code: 104 names, 84 of them for training


def names(rng, n):
    """n "First Last" names: n distinct first names, each with a surname drawn by `rng` (surnames may repeat)."""
    return [f"{f} {rng.choice(SURNAMES)}" for f in rng.sample(FIRST_NAMES, n)]


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


# --- the built-in datasets: one seed fixes every pairing --------------------------------------------

def hop_pairs(seed):
    """20 (name, (city, language, landmark)) pairs: 20 names and a permutation of the cities, both by `seed`."""
    rng = random.Random(seed)
    cities = rng.sample(CITIES, len(CITIES))
    return list(zip(names(rng, len(CITIES)), cities))


def first_hop(seed=0):
    pairs = hop_pairs(seed)
    return {"facts": [Example(f"{n} lives in", c) for n, (c, _, _) in pairs],
            "implications": [Example(f"The people in the city {n} is from speak", lang) for n, (_, lang, _) in pairs]}


def second_hop(seed=0):
    pairs = hop_pairs(seed)
    return {"facts": [Example(f"The mayor of {c} is", n) for n, (c, _, _) in pairs],
            "implications": [Example(f"The mayor of the city that contains {lm} is", n) for n, (_, _, lm) in pairs]}


def daxwug(seed=0, n_train=N_DAXWUG_TRAIN["daxwug"]):
    """Novel relations (Sec. 6.1): name -dax-> city, city -> animal, so name -zong-> animal."""
    rng = random.Random(seed)
    cities = [c for c, _, _ in CITIES]
    animal = dict(zip(cities, rng.sample(ANIMALS, len(ANIMALS))))            # each city a random animal
    all_names = names(rng, n_train + len(cities))                             # every first name once
    test_names, train_names = all_names[:len(cities)], all_names[len(cities):]
    test_city = dict(zip(test_names, rng.sample(cities, len(cities))))        # each city exactly once
    # each training name a random city, balanced (4 names per city; the authors' 84: 4 more cities once) so that
    # every split has all 20 candidates
    pool = cities * (n_train // len(cities)) + rng.sample(cities, n_train % len(cities))
    train_city = dict(zip(train_names, rng.sample(pool, len(pool))))
    # counterfactual: reshuffle the same pool until every training name really moves to another city
    while True:
        cf_city = dict(zip(train_names, rng.sample(pool, len(pool))))
        if all(cf_city[n] != train_city[n] for n in train_names):
            break

    def facts(city_of):
        return [Example(f"{n} dax is", c) for n, c in city_of.items()]

    def impls(city_of):
        return [Example(f"{n} zong is the", animal[c]) for n, c in city_of.items()]

    d = {"train_facts": facts(train_city), "train_impls": impls(train_city),
         "test_facts": facts(test_city), "test_impls": impls(test_city),
         "cf_facts": facts(cf_city), "cf_impls": impls(cf_city)}
    d["facts"], d["implications"] = d["test_facts"], d["test_impls"]         # aliases: the test split
    return d


# --- user datasets ------------------------------------------------------------------------------------

def load_json_dataset(path):
    """A user dataset; every problem is reported with where it is, e.g. `facts[3]: 'answer' is missing`."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:                                        # [[[[...]]]] thousands deep
        raise ValueError(f"{path}: nested too deeply to be a dataset: use {{\"facts\": [...], "
                         f"\"implications\": [...]}}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: the top level must be an object with keys 'facts' and 'implications'")
    extra = sorted(set(raw) - {"facts", "implications"})
    if extra:
        raise ValueError(f"{path}: unknown key {extra[0]!r} (allowed: 'facts', 'implications')")
    out, answer_of = {}, {}                                       # prompt -> (where, answer), over both splits
    for split in ("facts", "implications"):
        items = raw.get(split)
        if not isinstance(items, list) or not items:
            raise ValueError(f"{path}: {split!r} must be a non-empty list of {{\"prompt\": ..., \"answer\": ...}}")
        out[split] = []
        for i, it in enumerate(items):
            where = f"{path}: {split}[{i}]"
            if not isinstance(it, dict):
                raise ValueError(f"{where}: must be an object {{\"prompt\": ..., \"answer\": ...}}, got {it!r}")
            for key in ("prompt", "answer"):
                if key not in it:
                    raise ValueError(f"{where}: {key!r} is missing")
                if not isinstance(it[key], str) or not it[key].strip():
                    raise ValueError(f"{where}: {key!r} must be a non-empty string, got {it[key]!r}")
            if set(it) - {"prompt", "answer"}:
                raise ValueError(f"{where}: unknown key {sorted(set(it) - {'prompt', 'answer'})[0]!r}")
            if it["prompt"] != it["prompt"].rstrip() or it["answer"] != it["answer"].lstrip():
                raise ValueError(f"{where}: the prompt may not end and the answer may not start with "
                                 f"whitespace (the text is prompt + ' ' + answer)")
            first, answer = answer_of.setdefault(it["prompt"], (where, it["answer"]))
            if answer != it["answer"]:                            # training or ranking on both teaches nothing
                raise ValueError(f"{first} and {split}[{i}] give the prompt {it['prompt']!r} two answers "
                                 f"({answer!r}, {it['answer']!r}): keep one")
            out[split].append(Example(it["prompt"], it["answer"]))
    return out


def load_dataset(name_or_path, seed=0):
    """Splits by name -> list of Example. first_hop, second_hop and .json files: 'facts', 'implications';
    daxwug: 'train_facts', 'train_impls', 'test_facts', 'test_impls', 'cf_facts', 'cf_impls' (+ aliases)."""
    name = str(name_or_path)
    if name in DATASETS:
        if name.startswith("daxwug"):
            return daxwug(seed, N_DAXWUG_TRAIN[name])
        return {"first_hop": first_hop, "second_hop": second_hop}[name](seed)
    if name.endswith(".json") or Path(name).exists():
        return load_json_dataset(name)
    raise ValueError(f"unknown dataset {name!r}: use one of {', '.join(DATASETS)} or a path to a .json file")


def dataset_name(name_or_path):
    """A short name for output directories: the built-in name or the file's stem, reduced to safe characters
    (a stem like "" or ".." would otherwise turn runs/<name> into runs/ itself)."""
    if name_or_path in DATASETS:
        return name_or_path
    return re.sub(r"[^A-Za-z0-9_.-]", "_", Path(name_or_path).stem).strip(".") or "dataset"


# --- training phases: what a finetune trains on, in which order --------------------------------------

def phases(ds, order=None, name="the dataset"):
    """The training phases of dataset `ds` (named `name` in errors), as (phase name, training examples, evaluation
    splits {"facts", "implications"}): one phase on the facts, or for daxwug (Sec. 6.1) continued pretraining on the
    train split in the given order (Fig. 4; default joint), then finetuning on the test facts."""
    if "test_facts" not in ds:
        if order:
            raise ValueError(f"--order {order} applies to daxwug (train and test splits), not to {name}")
        return [("finetune", ds["facts"], {"facts": ds["facts"], "implications": ds["implications"]})]
    train_ev = {"facts": ds["train_facts"], "implications": ds["train_impls"]}
    pre = {"facts_first": [("pretrain_facts", ds["train_facts"]), ("pretrain_impls", ds["train_impls"])],
           # the forgetting control: the facts stay in the implication phase (replay), so F is still known when
           # Impl F is learned, as the paper's premise has it
           "facts_first_replay": [("pretrain_facts", ds["train_facts"]),
                                  ("pretrain_impls", ds["train_impls"] + ds["train_facts"])],
           "impl_first": [("pretrain_impls", ds["train_impls"]), ("pretrain_facts", ds["train_facts"])],
           "joint": [("pretrain_joint", ds["train_facts"] + ds["train_impls"])]}[order or "joint"]
    return [(n, ex, train_ev) for n, ex in pre] + \
        [("finetune", ds["test_facts"], {"facts": ds["test_facts"], "implications": ds["test_impls"]})]


# --- tokenization ---------------------------------------------------------------------------------------

def _pad(seqs, value):
    """Right-pad lists of ints into a (B, T) LongTensor."""
    T = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (T - len(s)) for s in seqs], dtype=torch.long)


def _encode(tokenizer, texts):
    """Token id lists with the tokenizer's own special tokens; any padding its tokenizer.json sets is dropped."""
    return [[i for i, m in zip(e.ids, e.attention_mask) if m] for e in tokenizer.encode_batch(list(texts))]


def encode_prompts(tokenizer, prompts):
    """(input_ids, attention_mask), both (B, T), right-padded; with the tokenizer's own special tokens."""
    seqs = _encode(tokenizer, prompts)
    if any(len(s) == 0 for s in seqs):
        raise ValueError("an empty prompt encodes to no tokens")
    return _pad(seqs, 0), _pad([[1] * len(s) for s in seqs], 0)


def candidate_ids(tokenizer, answers):
    """(C,) the first token of " " + answer (no special tokens) for each answer; they must be distinct."""
    first = []
    for a in answers:
        ids = tokenizer.encode(" " + a, add_special_tokens=False).ids
        if not ids:
            raise ValueError(f"answer {a!r} encodes to no tokens")
        first.append(ids[0])
    seen = {}
    for a, t in zip(answers, first):
        if t in seen and seen[t] != a:
            raise ValueError(f"answers {seen[t]!r} and {a!r} share their first token {tokenizer.id_to_token(t)!r} "
                             f"with this tokenizer, so the mean rank cannot tell them apart: change one of them")
        seen[t] = a
    return torch.tensor(first, dtype=torch.long)


def encode_examples(tokenizer, examples):
    """Training batch tensors: (input_ids, attention_mask, labels), each (N, T), right-padded.
    labels = -100 on prompt and padding tokens, the token ids on the answer tokens."""
    texts = [e.prompt for e in examples] + [f"{e.prompt} {e.answer}" for e in examples]
    enc = _encode(tokenizer, texts)
    prompts, fulls = enc[:len(examples)], enc[len(examples):]
    labels = []
    for e, p, f in zip(examples, prompts, fulls):
        # the loss is on the answer tokens only; that needs the prompt's tokens to start the full text's
        if f[:len(p)] != p or len(f) == len(p):
            raise ValueError(f"the tokens of prompt {e.prompt!r} are not a prefix of the tokens of "
                             f"{e.prompt + ' ' + e.answer!r} with this tokenizer: the answer tokens cannot be "
                             f"separated (does the tokenizer append an EOS or merge across the space?)")
        labels.append([-100] * len(p) + f[len(p):])
    return _pad(fulls, 0), _pad([[1] * len(f) for f in fulls], 0), _pad(labels, -100)


def check_context(tokenizer, examples, max_positions):
    """Every text `prompt + " " + answer` fits the model's context: a one-line error naming the first that does not."""
    for e in examples if max_positions is not None else ():
        n = len(tokenizer.encode(f"{e.prompt} {e.answer}").ids)
        if n > max_positions:
            raise ValueError(f"the text {e.prompt[:60]!r}... is {n} tokens long, more than the model's context of "
                             f"{max_positions} (max_position_embeddings): shorten it")


# --- the metric -------------------------------------------------------------------------------------------

def candidates(tokenizer, examples):
    """The split's distinct answers (in order of first appearance), their first tokens (C,), and the index of
    each example's answer among them (N,)."""
    answers = list(dict.fromkeys(e.answer for e in examples))
    cands = candidate_ids(tokenizer, answers)
    index = {a: i for i, a in enumerate(answers)}
    return answers, cands, torch.tensor([index[e.answer] for e in examples], dtype=torch.long)


def logits_at_last(model, ids, mask, taps=None):
    """(B, V) fp32 logits at each right-padded row's last real token; the output head runs only there.
    Differentiable: the scores take gradients through it."""
    h = model.hidden(ids, mask, taps)                                       # (B, T, D)
    last = mask.sum(1) - 1                                                  # (B,) right padding
    h_last = h[torch.arange(len(ids), device=ids.device), last]             # (B, D)
    with torch.autocast(ids.device.type, enabled=False):                    # the head in full precision
        return model.logits(h_last).float()                                 # (B, V)


@torch.no_grad()
def last_logits(model, tokenizer, examples, batch_size=32):
    """(N, V) fp32 logits at each prompt's last token, in batches."""
    device = next(model.parameters()).device
    out = []
    for i in progress(range(0, len(examples), batch_size), f"ranks of {len(examples)} prompts", unit="batch"):
        ids, mask = encode_prompts(tokenizer, [e.prompt for e in examples[i:i + batch_size]])
        out.append(logits_at_last(model, ids.to(device), mask.to(device)))
    return torch.cat(out)


def ranks_from_logits(logits_last, correct, cand_ids):
    """(N,) 0-indexed rank of each correct candidate; ties count half. logits_last (N, V); correct (N,) index
    into cand_ids (C,)."""
    s = logits_last[:, cand_ids.to(logits_last.device)]                     # (N, C)
    if not bool(torch.isfinite(s).all()):                                   # NaN compares unequal: no rank
        raise ValueError("the model's logits are not finite (nan or inf): the weights are damaged or diverged")
    own = s.gather(1, correct.to(s.device)[:, None])                        # (N, 1)
    higher = (s > own).sum(1).float()
    ties = (s == own).sum(1).float() - 1                                    # the others scoring the same
    return higher + 0.5 * ties


def mean_rank(model, tokenizer, examples, batch_size=32):
    """Mean rank of Sec. 3 over `examples`; candidates: all distinct answers of `examples`."""
    _, cands, correct = candidates(tokenizer, examples)
    return ranks_from_logits(last_logits(model, tokenizer, examples, batch_size), correct, cands).mean().item()


def reward(logits_last, correct_ids, cand_ids):
    """R = logit(correct first token) - mean over candidates of logit(candidate first token), (N,).
    correct_ids are token ids (N,); differentiable (the scores take its gradient)."""
    own = logits_last.gather(-1, correct_ids[..., None]).squeeze(-1)        # (N,)
    return own - logits_last[..., cand_ids].mean(-1)
