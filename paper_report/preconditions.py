"""What the base model must already know for the paper's OCR claims to be testable on it (Sec. 5.1): a
first-hop update composes the new fact name -> city with the known city -> language, a second-hop update the new
city -> mayor with the known landmark -> city. If the base model does not know that known hop, a failure of OCR
says nothing about extractive structures, and the claims report 'inconclusive' (claims.BASE_KNOWS).

base_knowledge measures, with the mean rank of Sec. 3 among the split's 20 answers, the known hops alone and
both hops with the new fact given in context (can the model compose them at all, with nothing finetuned?).
report.py runs it as a stage and writes its dict to seed{s}/preconditions.json.

salience goes beyond the paper, after Ghosal et al. ("Understanding Finetuning for Factual Knowledge Extraction":
finetuning on facts the model knows well generalizes better): per implication, how well the base model knows its
known hop (its logit margin and rank on the pair's own city -> language or landmark -> city) against the rank of
that implication after the finetune. report.py writes it to seed{s}/salience.json; paper_report/collect.py correlates
them.
"""
import data
from run_setup import dist


def city_language(city, language):
    """The first hop's known hop: city -> language."""
    return data.Example(f"The people in the city of {city} speak", language)


def landmark_city(city, landmark):
    """The second hop's known hop: landmark -> city."""
    return data.Example(f"{landmark} is in the city of", city)


def known_hop_examples(seed=0):
    """{key: [Example]}: the known hops on their own, and the two-hop implications with the fact in context.
    The cities, languages and landmarks are data.py's, paired with names by the same seed as the datasets."""
    pairs = data.hop_pairs(seed)                                   # [(name, (city, language, landmark))]
    return {
        "city_language": [city_language(c, lang) for c, lang, _ in data.CITIES],
        "landmark_city": [landmark_city(c, lm) for c, _, lm in data.CITIES],
        # the first-hop implication with its fact stated just before it
        "in_context_first_hop": [data.Example(f"{n} lives in {c}. The people in the city {n} is from speak", lang)
                                 for n, (c, lang, _) in pairs],
        # the second-hop implication with its fact stated just before it
        "in_context_second_hop": [data.Example(f"The mayor of {c} is {n}. The mayor of the city that contains "
                                               f"{lm} is", n) for n, (c, _, lm) in pairs],
    }


def base_knowledge(model, tok, seed=0):
    """{key: the base model's mean rank} for the keys of known_hop_examples, plus the number of examples and one
    prompt of each, so that preconditions.json says what was asked."""
    ex = known_hop_examples(seed)
    out = {k: data.mean_rank(model, tok, v) for k, v in ex.items()}
    out["n"] = {k: len(v) for k, v in ex.items()}
    out["example_prompt"] = {k: f"{v[0].prompt} -> {v[0].answer}" for k, v in ex.items()}
    out["seed"] = seed
    return out


def per_prompt(model, tok, examples):
    """(ranks, margins) per example: the mean-rank metric's rank among the split's answers, and the logit of the
    right answer's first token minus the best other candidate's (> 0: the model answers right)."""
    _, cands, correct = data.candidates(tok, examples)
    full = data.last_logits(model, tok, examples)                            # (N, V)
    logits = full[:, cands]                                                  # (N, C)
    own = logits.gather(1, correct[:, None]).squeeze(1)
    others = logits.scatter(1, correct[:, None], float("-inf")).max(1).values
    ranks = data.ranks_from_logits(full, correct, cands)
    return ranks.tolist(), (own - others).tolist()


def salience(base_model, tok, finetunes, seed=0, device="cpu"):
    """{hop: {"prompts", "base_rank", "base_margin" (the known hop, base model), "impl_rank" (the finetune)}}
    for each hop's finetune directory in `finetunes`; the known-hop prompt of each implication is the one about
    its own pair's city (landmark), asked among the 20 cities' answers as in base_knowledge."""
    pairs = data.hop_pairs(seed)                                   # implication i is about pairs[i]
    known = {"first_hop": [city_language(c, lang) for _, (c, lang, _) in pairs],
             "second_hop": [landmark_city(c, lm) for _, (c, _, lm) in pairs]}
    out = {}
    for hop, ckpt in finetunes.items():
        b_rank, b_margin = per_prompt(base_model, tok, known[hop])
        impl = data.load_dataset(hop, seed=seed)["implications"]
        i_rank, _ = per_prompt(dist.load(ckpt, device), tok, impl)   # data.last_logits: no_grad
        out[hop] = {"prompts": [e.prompt for e in impl], "known_prompts": [e.prompt for e in known[hop]],
                    "base_rank": b_rank, "base_margin": b_margin, "impl_rank": i_rank}
    return out
